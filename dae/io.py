"""Atomic writes (a temporary file in the target's directory, then a rename) and file digests.

A reader (or a stage killed half-way) sees either the old file or the new one, never a
half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        # Flush to disk before the rename so a crash cannot leave an empty "new" file.
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call `writer(tmp_path)` and atomically move the result onto `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically and byte-for-byte reproducibly.

    Saved to a file, torch names the archive's folder after that file, here a random temporary
    name: the same tensors would give different bytes, and DVC would see a changed output.
    Serialising to memory first gives the fixed folder name "archive"."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_with(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """The hex digest of a file's bytes: MD5 as dvc.lock records outputs, SHA-256 for the data."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()
