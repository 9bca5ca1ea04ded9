"""Shared fixtures: the real MNIST mirror (../shared/data/mnist or $DAE_DATA_MIRROR)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mnist_mirror_path() -> Path | None:
    candidates = [os.environ.get("DAE_DATA_MIRROR"), ROOT.parent / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    path = mnist_mirror_path()
    if path is None:
        pytest.fail("the real MNIST mirror is missing: set DAE_DATA_MIRROR or provide ../shared/data/mnist")
    return path


@pytest.fixture(scope="session")
def mnist_raw(mnist_mirror, tmp_path_factory) -> Path:
    """The four IDX files, downloaded (verified) once per test session from the mirror."""
    from dae.data import download

    out = tmp_path_factory.mktemp("raw")
    download("mnist", out, mirrors=[str(mnist_mirror)])
    return out
