"""MNIST-style IDX files: checksummed download from mirrors, parsing, and train/val/test splits."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dae.env import switch
from dae.io import file_digest

log = logging.getLogger(__name__)

MIRROR_ENV = "DAE_DATA_MIRROR"
PUBLIC_ENV = "DAE_PUBLIC_MIRRORS"  # "off": use $DAE_DATA_MIRROR only (offline machines fail fast)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    # SHA-256 of the *decompressed* IDX files; gzip wrappers differ between mirrors.
    sha256: dict[str, str]


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        # The two public mirrors torchvision uses, in its order.
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=(
            # Debian's package dataset-fashion-mnist installs the original files here; a local
            # folder is tried before the network (the checksums decide either way).
            "/usr/share/datasets/fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
}

# (file, expected number of items) per split.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


class DataError(RuntimeError):
    """A data file is missing, unreachable, corrupt or not what it claims to be."""




def _mirror_list(spec: DatasetSpec) -> list[str]:
    """The environment's mirror first (a directory or URL), then the public ones."""
    mirrors = []
    local = os.environ.get(MIRROR_ENV)
    if local:
        mirrors.append(local)
    if switch(PUBLIC_ENV):
        mirrors.extend(spec.mirrors)
    if not mirrors:
        raise DataError(f"no mirrors to try: {PUBLIC_ENV}=off and {MIRROR_ENV} is not set")
    return mirrors


def _fetch_one(mirror: str, name: str, dest: Path, timeout: float) -> str:
    """Copy `name` (gzipped or plain) from one mirror into `dest`, decompressed. Returns the source."""
    is_url = "://" in mirror and not mirror.startswith("file://")
    if not is_url:
        base = Path(mirror.removeprefix("file://")).expanduser()
        if not base.is_dir():
            raise DataError(f"mirror directory {base} does not exist")
        for candidate in (base / f"{name}.gz", base / name):
            if candidate.is_file():
                _decompress_into(candidate, dest)
                return str(candidate)
        raise DataError(f"{name} is missing from mirror {base} (looked for {name}.gz and {name})")
    url = mirror.rstrip("/") + f"/{name}.gz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest.with_suffix(".gz"), "wb") as out:
            shutil.copyfileobj(resp, out)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        dest.with_suffix(".gz").unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {exc}") from exc
    try:
        _decompress_into(dest.with_suffix(".gz"), dest)
    finally:
        dest.with_suffix(".gz").unlink(missing_ok=True)
    return url


def _decompress_into(src: Path, dest: Path) -> None:
    try:
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, dest)
    except (EOFError, OSError, zlib.error) as exc:
        dest.unlink(missing_ok=True)
        raise DataError(f"{src} is not a valid gzip file (truncated or corrupt): {exc}") from exc


def download(dataset: str, out_dir: str | Path, mirrors: list[str] | None = None,
             timeout: float = 30.0) -> dict[str, str]:
    """Fetch every IDX file of `dataset` into `out_dir`, verified by SHA-256.

    `mirrors` (folders or URLs) default to $DAE_DATA_MIRROR, then the public mirrors. Each
    file is tried on every mirror in order; all files are verified in temporary names
    first and renamed into place only when all of them are good, so `out_dir` never holds a
    partial set. Returns {file: source it came from}.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    sources: dict[str, str] = {}
    try:
        for name, expected in spec.sha256.items():
            tmp = out_dir / f".{name}.part"
            errors = []
            for mirror in mirrors if mirrors is not None else _mirror_list(spec):
                try:
                    source = _fetch_one(mirror, name, tmp, timeout)
                except DataError as exc:
                    errors.append(str(exc))
                    continue
                actual = file_digest(tmp, "sha256")
                if actual != expected:
                    tmp.unlink(missing_ok=True)
                    errors.append(f"checksum mismatch for {name} from {source}: "
                                  f"SHA-256 {actual}, expected {expected}")
                    continue
                staged[name], sources[name] = tmp, source
                log.info("%s: verified (from %s)", name, source)
                break
            else:
                raise DataError(f"could not get a verified copy of {name}:\n  " + "\n  ".join(errors))
        for name, tmp in staged.items():
            os.replace(tmp, out_dir / name)
    finally:
        for tmp in out_dir.glob(".*.part*"):
            tmp.unlink(missing_ok=True)
    return sources


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (uint8 data) into an array, checking the header against the size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    raw = path.read_bytes()
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: wrong IDX magic number 0x{raw[:4].hex()} "
                        "(expected 0x00000801 for labels or 0x00000803 for images)")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes of data) "
                        f"but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(raw_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 784] and labels as int64 [N] for 'train' or 'test'."""
    images_file, labels_file, count = SPLIT_FILES[split]
    images = read_idx(Path(raw_dir) / images_file)
    labels = read_idx(Path(raw_dir) / labels_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_file}: expected 28x28 images, got shape {images.shape}")
    if images.shape[0] != count or labels.shape != (count,):
        raise DataError(f"{split} split: expected {count} images and labels, "
                        f"got {images.shape[0]} images and {labels.shape[0]} labels")
    return images.reshape(count, 784), labels.astype(np.int64)


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle of range(n) cut into (train, validation) index arrays."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])
