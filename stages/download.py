"""download: the dataset's IDX files into data/raw/, verified by SHA-256.

Mirrors are tried in order: $DAE_DATA_MIRROR (a folder or URL) first, then the public ones.
"""
from stages.common import load_params, log, run_stage


def main() -> None:
    from dae.data import download

    params = load_params(["data"])
    sources = download(params["data"]["dataset"], "data/raw")
    log.info("data/raw: %d files verified", len(sources))


if __name__ == "__main__":
    run_stage("download", main)
