"""The stages' model files ({"arch", "seeds": {seed: state_dict}}) and the per-epoch resume state."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from dae.env import switch

RESUME_ENV = "DAE_RESUME"  # off: an interrupted training starts again from epoch 0
# In every fingerprint: a state saved in another layout (e.g. another optimizer's) is not resumed.
RESUME_FORMAT = b"fit state 2: dae.adam.Adam\n"


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or does not match params.yaml."""


def load_checkpoint(path: str | Path, expected_arch: dict, seeds: list[int]) -> dict:
    """Load a {"arch", "seeds": {seed: state_dict}} checkpoint and check it against params."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({type(exc).__name__}: {exc}); "
                              "delete it and rerun `dvc repro`") from exc
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "seeds" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no arch/seeds)")
    if ckpt["arch"] != expected_arch:
        raise CheckpointError(f"{path} has architecture {ckpt['arch']} but params.yaml asks for "
                              f"{expected_arch}; rerun the stages that make it (`dvc repro`)")
    missing = [s for s in seeds if s not in ckpt["seeds"]]
    if missing:
        raise CheckpointError(f"{path} has no weights for seeds {missing} listed in params.yaml `seeds`")
    return ckpt


def resume_state(folder: str | Path, name: str, params: dict, model: nn.Module,
                 inputs: torch.Tensor) -> tuple[Path | None, str]:
    """Where the stacked members `name` save their per-epoch state under `folder`, and the
    fingerprint that decides whether a state left there by an interrupted run may be resumed:
    the params, the initial weights and the training data. (None, "") with DAE_RESUME=off."""
    if not switch(RESUME_ENV):
        return None, ""
    digest = hashlib.sha256(RESUME_FORMAT + json.dumps(params, sort_keys=True, default=str).encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    digest.update(f"{tuple(inputs.shape)}".encode())
    digest.update(inputs[..., :256, :].detach().cpu().contiguous().numpy().tobytes())
    return Path(folder) / f"{name}.pt", digest.hexdigest()


def clear_resume_state(folder: str | Path) -> None:
    """The stage finished and wrote its outputs: its resume state is no longer needed."""
    shutil.rmtree(folder, ignore_errors=True)
