"""download: the dataset's IDX files into OUT (data/raw), verified by SHA-256.

Mirrors are tried in order: $DAE_DATA_MIRROR (a folder or URL) first, then the public ones.
"""
from stages.common import load_params, log, parser, run_stage


def main(args, name: str) -> None:
    from dae.data import download

    params, _ = load_params("download")
    sources = download(params["data"]["dataset"], args.out)
    log.info("%s: %d files verified", args.out, len(sources))


if __name__ == "__main__":
    cli = parser(__doc__, "stages.download")
    cli.add_argument("out", help="folder for the IDX files")
    run_stage("download", cli, main)
