"""noise: split train/validation, corrupt every split with seeded noise, write OUT/<split>.pt.

Each file holds the clean images (uint8), their fixed noisy copy (float32) and the labels.
The 10k test set is only ever read by evaluate and figures.
"""
from stages.common import load_params, log, parser, run_stage


def main(args, name: str) -> None:
    import torch

    from dae.data import read_idx_split, split_indices
    from dae.noise import corrupt
    from dae.splits import SPLITS, save_split

    params, _ = load_params("noise")
    data, noise = params["data"], params["noise"]
    train_images, train_labels = read_idx_split(args.raw, "train")
    test_images, test_labels = read_idx_split(args.raw, "test")
    train_idx, val_idx = split_indices(len(train_images), data["val_size"], data["split_seed"])
    if data["train_limit"]:
        train_idx = train_idx[:data["train_limit"]]
    test_limit = data["test_limit"] or len(test_images)
    splits = {"train": (train_images[train_idx], train_labels[train_idx]),
              "val": (train_images[val_idx], train_labels[val_idx]),
              "test": (test_images[:test_limit], test_labels[:test_limit])}
    for split in SPLITS:
        images, labels = splits[split]
        clean = torch.from_numpy(images.copy())
        # One generator per split: the test copy does not change when train_limit does.
        generator = torch.Generator().manual_seed(noise["seed"] * 1000 + SPLITS.index(split))
        noisy = corrupt(clean.float() / 255.0, noise["type"], noise["level"], generator, noise["clip"])
        save_split(args.out, split, clean, noisy, torch.from_numpy(labels.copy()))
        log.info("%s: %d images, %s noise level %g (mean |x̃ - x| %.4f)", split, len(clean),
                 noise["type"], noise["level"], (noisy - clean.float() / 255.0).abs().mean())


if __name__ == "__main__":
    cli = parser(__doc__, "stages.noise")
    cli.add_argument("raw", help="folder of the IDX files (download's output)")
    cli.add_argument("out", help="folder for train.pt, val.pt, test.pt")
    run_stage("noise", cli, main)
