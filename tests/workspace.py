"""A throw-away copy of the repository with the tiny profile, as the end-to-end tests use it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
Runner = Callable[..., subprocess.CompletedProcess]


def apply_tiny_profile(params_file: Path, overrides: dict) -> None:
    params = yaml.safe_load(params_file.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def make_workspace(ws: Path, mnist_mirror: Path, env_overrides: dict[str, str] | None = None) -> Runner:
    """Copy what git would clone into `ws` (no data, reports or lock), apply the tiny profile,
    commit it in a fresh git repository, and return a runner for commands inside it."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("data/", "reports/")) and name != "dvc.lock":
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, ws / name)
    apply_tiny_profile(ws / "params.yaml", yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text()))
    env = {**os.environ, "DAE_DATA_MIRROR": str(mnist_mirror),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DAE_TRACKING", None)
    # `dvc exp run` commits experiment refs: give git an identity even on a bare CI machine.
    env |= {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    env |= env_overrides or {}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
        return result

    run("git", "init", "-q")
    run("git", "commit", "-q", "--allow-empty", "-m", "empty")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "tiny profile")
    return run
