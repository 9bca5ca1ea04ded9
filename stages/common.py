"""The command-line shell every stage shares: its params as dvc.yaml declares them, logging, the
workspace DVC runs it in, and one clear line for the errors a user can cause."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable

import yaml

from dae import params as params_mod

log = logging.getLogger("stages")

DVC_YAML = Path("dvc.yaml")
# Per-epoch training state of an interrupted stage, resumed by the next `dvc repro`; not an output.
RESUME_DIR = Path("data/checkpoints")


def declared_sections(stage: str, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The params.yaml sections of `stage` (`pretrain_layer` for its foreach items), read from its
    `params:` in dvc.yaml, the one place they are listed: `data.dataset` gives `data`."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    entry = stages[stage].get("do", stages[stage])
    keys = [key for key in entry.get("params", []) if isinstance(key, str)]
    return list(dict.fromkeys(key.split(".")[0] for key in keys))


def stage_commands(dvc_yaml: Path = DVC_YAML) -> list[tuple[str, list[str]]]:
    """(name, argv) of every stage in dvc.yaml's order (`pretrain_layer@2`: its foreach item filled
    in), `python` being this interpreter: how to run the stages without DVC, one after another
    (dvc.yaml lists each stage after the stages whose outputs it reads)."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    commands = []
    for name, entry in stages.items():
        items = entry["foreach"].items() if "foreach" in entry else [(None, None)]
        for key, item in items:
            cmd = entry["do"]["cmd"] if key is not None else entry["cmd"]
            if key is not None:
                cmd = cmd.replace("${key}", key)
                for field, value in item.items():
                    cmd = cmd.replace(f"${{item.{field}}}", str(value))
            words = shlex.split(cmd)
            if words[0] != "python":
                raise ValueError(f"stage {name}: expected a `python` command, got {cmd!r}")
            commands.append((f"{name}@{key}" if key is not None else name, [sys.executable, *words[1:]]))
    return commands


def load_params(stage: str) -> tuple[dict, list[str]]:
    """params.yaml validated for `stage`'s declared sections, and those sections."""
    sections = declared_sections(stage)
    return params_mod.load("params.yaml", sections), sections


def tracking_root() -> tuple[Path, bool]:
    """The user's repository, where mlflow.db lives, and whether the stage runs in its workspace.
    DVC sets DVC_ROOT to the user's repository, also for a queued or temporary experiment, whose
    stages run in a copy under .dvc/tmp/exps/ (their registered models do not move `current`)."""
    cwd = Path.cwd().resolve()
    root = Path(os.environ.get("DVC_ROOT") or cwd).resolve()
    return root, root == cwd


def resume_dir(stage: str) -> Path:
    """Where `stage`'s members keep their per-epoch state while it trains."""
    return RESUME_DIR / stage.replace("@", "_")


def run_stage(stage: str, parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace, str], None],
              item: Callable[[argparse.Namespace], str] | None = None) -> None:
    """Parse argv and run `main(args, name)`, `name` the stage as dvc.yaml addresses it
    (`pretrain_layer@3`: DVC's DVC_STAGE, or `item` of the arguments when run by hand). Log lines
    and errors carry the name; the errors a user can cause become one line and exit status 1."""
    args = parser.parse_args()
    name = os.environ.get("DVC_STAGE") or (f"{stage}@{item(args)}" if item else stage)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name}: %(message)s", datefmt="%H:%M:%S")
    from dae.checkpoint import CheckpointError
    from dae.data import DataError
    from dae.env import SwitchError
    from dae.tracking import TrackingError
    from dae.train import TrainingDiverged

    known = (DataError, params_mod.ParamError, TrackingError, TrainingDiverged, CheckpointError, SwitchError)

    def interrupted(signum, _frame):
        # Unwind normally so that half-written temporary files are removed (see dae.io).
        raise SystemExit(f"stage {name} interrupted by {signal.Signals(signum).name}; "
                         "its outputs were not replaced. Rerun `dvc repro`.")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        main(args, name)
    except known as exc:
        print(f"ERROR in stage {name}: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # full disk, unwritable folder, missing input
        print(f"ERROR in stage {name}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        sys.exit(1)


def parser(doc: str, prog: str) -> argparse.ArgumentParser:
    """A stage's argument parser: its docstring as help; its paths are arguments, as dvc.yaml passes them."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
