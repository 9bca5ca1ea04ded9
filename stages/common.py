"""What every stage shares: logging, params, device, seeding, data loading, error reporting."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from dae import params as params_mod

log = logging.getLogger("stages")

NOISY_DIR = Path("data/noisy")
PRETRAIN_DIR = Path("data/models/pretrain")
FINETUNE_DIR = Path("data/models/finetune")
CURVES_DIR = Path("reports/curves")
CHECKPOINT_DIR = Path("data/checkpoints")  # per-epoch training state; not a DVC output
RESUME_ENV = "DAE_RESUME"
LOG_FORMAT = "%(asctime)s %(message)s"  # run_stage adds the stage's name; worker processes copy it


def stage_name(name: str) -> str:
    """The stage as dvc.yaml names it: `finetune@greedy_ft` for `python -m stages.finetune greedy_ft`."""
    items = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    return f"{name}@{items[0]}" if len(items) == 1 else name


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main; turn the errors a user can cause into one clear line and exit 1.
    Log lines and errors carry the foreach item too (`pretrain_layer@3`)."""
    global LOG_FORMAT
    name = stage_name(name)
    LOG_FORMAT = f"%(asctime)s {name}: %(message)s"
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")
    from dae.data import DataError
    from dae.params import ParamError
    from dae.tracking import TrackingError
    from dae.train import TrainingDiverged

    known = (DataError, ParamError, TrackingError, TrainingDiverged, CheckpointError)

    def interrupted(signum, _frame):
        # Unwind normally so that half-written temporary files are removed (see dae.io).
        raise SystemExit(f"stage {name} interrupted by {signal.Signals(signum).name}; "
                         "its outputs were not replaced. Rerun `dvc repro`.")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        main()
    except known as exc:
        print(f"ERROR in stage {name}: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # full disk, unwritable folder, missing input
        print(f"ERROR in stage {name}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        sys.exit(1)


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or does not match params.yaml."""


def load_params(sections: list[str]) -> dict:
    return params_mod.load("params.yaml", sections)


def data_inputs(splits: list[str]) -> list[dict[str, str]]:
    """The data sets a stage reads, as its MLflow run records them: name (`mnist-train`), split,
    and a digest of what makes them these images: the original files' SHA-256 checksums, the
    split params and the noise params. Runs with equal digests saw equal data."""
    import hashlib
    import json

    from dae.data import DATASETS

    params = params_mod.load("params.yaml", ["data", "noise"])
    spec = DATASETS[params["data"]["dataset"]]
    source = next(m for m in spec.mirrors if m.startswith("http"))
    inputs = []
    for split in splits:
        recipe = {"sha256": spec.sha256, "data": params["data"], "noise": params["noise"], "split": split}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        inputs.append({"name": f"{spec.name}-{split}", "split": split, "digest": digest, "source": source})
    return inputs


def fit_config(params: dict, section: str, model: str | None = None):
    """The FitConfig of a params section; `model` picks its entry of a per-model `epochs`."""
    from dae.train import FitConfig

    cfg = params[section]
    epochs = cfg["epochs"][model] if isinstance(cfg["epochs"], dict) else cfg["epochs"]
    return FitConfig(epochs, cfg["batch_size"], cfg["lr"], cfg["weight_decay"], cfg["warmup_epochs"],
                     schedule=cfg["schedule"], precision=cfg["precision"])


def select_device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise params_mod.ParamError("device: 'cuda' was requested but CUDA is not available on this "
                                    "machine; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def make_deterministic(device) -> None:
    """Deterministic kernels (bit-identical CPU reruns; see README for CUDA)."""
    import torch
    import torch.utils.deterministic

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms(True) sets this flag, and also imports torch._inductor
    # (~1 s a process) for torch.compile's copy of it; no stage compiles (reports/method.md).
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:  # a PyTorch without the private setter: the public call does the same
        torch.use_deterministic_algorithms(True)
    else:
        set_flag(True)
    # Deterministic mode also fills every new tensor with NaN, a guard against reading memory
    # that was never written; every kernel here writes what it reads, and the fill costs ~3 %
    # of a one-process epoch (reports/method.md). The models are the same bits either way.
    torch.utils.deterministic.fill_uninitialized_memory = False


def load_split(split: str, device, noisy: bool = True) -> dict:
    """{"clean": float [N,784] in [0,1], "noisy": float [N,784], "labels": int64 [N]} on `device`.
    `noisy=False` leaves the noisy copy out: the file is then memory-mapped, so its noisy images
    are never read and take no memory (evaluate's classifiers: ~0.16 GB less a process on MNIST)."""
    import torch

    path = NOISY_DIR / f"{split}.pt"
    blob = torch.load(path, weights_only=True, mmap=not noisy)
    data = {"clean": blob["clean"].to(device).float().div_(255.0), "labels": blob["labels"].to(device).clone()}
    if noisy:
        data["noisy"] = blob["noisy"].to(device)
    return data


def load_checkpoint(path: Path, expected_arch: dict, seeds: list[int]) -> dict:
    """Load a {"arch", "seeds": {seed: state_dict}} checkpoint and check it against params."""
    import pickle
    import zipfile

    import torch

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


def write_curve(path: Path, histories: list[list[dict]]) -> None:
    """Per-epoch losses averaged over seeds, as CSV for `dvc plots`."""
    import pandas as pd

    from dae.io import write_with

    frame = pd.concat([pd.DataFrame(h) for h in histories]).groupby("epoch", as_index=False).mean()
    write_with(path, lambda tmp: frame[["epoch", "train_loss", "val_loss"]].to_csv(tmp, index=False))


def finish_members(runs, keys: list[str], results: list, model_path: Path) -> None:
    """Close the member runs of a training stage that wrote `model_path`: each gets its best
    epoch and the file's MD5 as a tag (evaluate links each logged model to the run that trained it)."""
    from dae.tracking import file_md5

    md5 = file_md5(model_path)
    for key, result in zip(keys, results):
        runs.log(key, {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
        runs.finish(key, tags={"output_md5": md5})


def training_checkpoint(stage: str, name: str, stage_params: dict, model, inputs) -> tuple[Path | None, str]:
    """Where the stacked members `name` of `stage` save their per-epoch state, and the fingerprint
    that decides whether a checkpoint left there by an interrupted run may be resumed: the stage's
    params, the initial weights and the training data. DAE_RESUME=off disables it."""
    import hashlib
    import json

    if os.environ.get(RESUME_ENV, "on").lower() in ("off", "0", "false", "no"):
        return None, ""
    digest = hashlib.sha256(json.dumps(stage_params, sort_keys=True, default=str).encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    digest.update(f"{tuple(inputs.shape)}".encode())
    digest.update(inputs[..., :256, :].detach().cpu().contiguous().numpy().tobytes())
    return CHECKPOINT_DIR / stage.replace("@", "_") / f"{name}.pt", digest.hexdigest()


def clear_checkpoints(stage: str) -> None:
    """The stage finished and wrote its outputs: its resume state is no longer needed."""
    import shutil

    shutil.rmtree(CHECKPOINT_DIR / stage.replace("@", "_"), ignore_errors=True)
