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
