"""stages/common.py: what every stage shares (the rest of it is exercised by the pipeline tests)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_deterministic_sets_torchs_flags_without_importing_the_compiler():
    # In a fresh interpreter: the flags are process-wide, and the point is what gets imported.
    code = ("import sys, torch, torch.utils.deterministic as d\n"
            "from stages.common import make_deterministic\n"
            "before = torch.are_deterministic_algorithms_enabled()\n"
            "make_deterministic(torch.device('cpu'))\n"
            "print(before, torch.are_deterministic_algorithms_enabled(), d.fill_uninitialized_memory,\n"
            "      'torch._inductor' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "False", "False"]


def test_load_split_without_the_noisy_copy_gives_the_same_clean_images_and_labels(tmp_path, monkeypatch):
    import torch

    from dae.io import save_torch
    from stages.common import NOISY_DIR, load_split

    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (50, 784), dtype=torch.uint8, generator=generator)
    # the noise stage's file layout: clean uint8, noisy float32, labels int64
    save_torch(NOISY_DIR / "train.pt", {"clean": clean, "noisy": torch.rand(50, 784, generator=generator),
                                        "labels": torch.arange(50) % 10})
    full, lean = load_split("train", "cpu"), load_split("train", "cpu", noisy=False)
    assert set(full) == {"clean", "noisy", "labels"} and set(lean) == {"clean", "labels"}
    assert torch.equal(full["clean"], clean.float() / 255) and torch.equal(lean["clean"], full["clean"])
    assert torch.equal(lean["labels"], full["labels"]) and lean["labels"].dtype == torch.int64
