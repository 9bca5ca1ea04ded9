"""dae/splits.py: the noise stage's split files."""
import torch

from dae.splits import load_split, save_split


def test_load_split_without_the_noisy_copy_gives_the_same_clean_images_and_labels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (50, 784), dtype=torch.uint8, generator=generator)
    save_split(tmp_path, "train", clean, torch.rand(50, 784, generator=generator), torch.arange(50) % 10)
    full, lean = load_split(tmp_path, "train", "cpu"), load_split(tmp_path, "train", "cpu", noisy=False)
    assert set(full) == {"clean", "noisy", "labels"} and set(lean) == {"clean", "labels"}
    assert torch.equal(full["clean"], clean.float() / 255) and torch.equal(lean["clean"], full["clean"])
    assert torch.equal(lean["labels"], full["labels"]) and lean["labels"].dtype == torch.int64
