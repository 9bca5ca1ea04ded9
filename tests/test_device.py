"""dae/device.py: the device choice and deterministic kernels."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_make_deterministic_sets_torchs_flags_without_importing_the_compiler():
    # In a fresh interpreter: the flags are process-wide, and the point is what gets imported.
    code = ("import sys, torch, torch.utils.deterministic as d\n"
            "from dae.device import make_deterministic\n"
            "before = torch.are_deterministic_algorithms_enabled()\n"
            "make_deterministic(torch.device('cpu'))\n"
            "print(before, torch.are_deterministic_algorithms_enabled(), d.fill_uninitialized_memory,\n"
            "      'torch._inductor' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "False", "False"]


def test_cuda_on_a_machine_without_one_is_a_param_error(monkeypatch):
    import torch

    from dae.device import select_device
    from dae.params import ParamError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ParamError, match="device: 'cuda' was requested but CUDA is not available"):
        select_device("cuda")
