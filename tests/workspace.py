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
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
# An experiment on Fashion-MNIST with a 2-d code, as tests/test_pipeline.py runs it.
FASHION_EXPERIMENT = ["exp", "run", "-n", "fashion-two-d", "-S", "data.dataset=fashion-mnist",
                      "-S", "arch.bottleneck=2"]
Runner = Callable[..., subprocess.CompletedProcess]


def apply_tiny_profile(params_file: Path, overrides: dict) -> None:
    params = yaml.safe_load(params_file.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


class Workspace:
    def __init__(self, path: Path, mirror: Path):
        self.path = path
        self.env = {**os.environ, "DAE_DATA_MIRROR": str(mirror), "DAE_TRACKING": "off",
                    "PYTHONPATH": str(path)}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_param(self, key: str, value) -> None:
        params = self.params()
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def command(self, stage: str) -> list[str]:
        """The command line dvc.yaml gives `stage` (`pretrain_layer@2`: its foreach item filled in),
        run by this interpreter."""
        from stages.common import stage_commands

        return dict(stage_commands(self.path / "dvc.yaml"))[stage]

    def stage(self, stage: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        """Run one stage as dvc.yaml would, outside DVC (no lock, no cache)."""
        return subprocess.run(self.command(stage), cwd=self.path, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def run_all(self, stages: list[str]) -> None:
        """Run stages in order; each must succeed."""
        for stage in stages:
            result = self.stage(stage)
            assert result.returncode == 0, f"{stage}: {result.stderr}"

    def copy(self, dest: Path) -> "Workspace":
        shutil.copytree(self.path, dest)
        return Workspace(dest, Path(self.env["DAE_DATA_MIRROR"]))

    def snapshot(self, folder: str) -> dict[str, bytes]:
        base = self.path / folder
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def prepare_workspace(path: Path, mnist_mirror: Path) -> Workspace:
    """The stages' code and the tiny profile in `path`, with download, noise and pretrain_layer 1
    run once (tracking off), for tests that run stage processes directly."""
    for item in ("dae", "stages", "dvc.yaml", "params.yaml", "tests/tiny_params.yaml"):
        src = ROOT / item
        (path / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, path / item)
    (path / ".dvc").mkdir()
    apply_tiny_profile(path / "params.yaml", yaml.safe_load((path / "tests/tiny_params.yaml").read_text()))
    ws = Workspace(path, mnist_mirror)
    ws.run_all(["download", "noise", "pretrain_layer@1"])
    return ws


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def runner(cwd: Path, env: dict[str, str]) -> Runner:
    """Run commands in `cwd` with `env`; a failing one (unless check=False) fails the test."""
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
        return result

    run.env = env  # type: ignore[attr-defined]
    return run


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
    run = runner(ws, env)
    run("git", "init", "-q")
    run("git", "commit", "-q", "--allow-empty", "-m", "empty")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "tiny profile")
    return run
