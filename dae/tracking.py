"""MLflow tracking: one run per pipeline stage, a nested run per seed, shared pipeline tags.

The default store is SQLite at the repository root (`mlflow.db`, artifacts in `mlruns/`),
resolved to absolute paths so runs land there from any working directory, including DVC's
temporary experiment workspaces under `.dvc/tmp/exps/`. `MLFLOW_TRACKING_URI` overrides it
(e.g. a tracking server); `DAE_TRACKING=off` disables tracking for offline work.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

EXPERIMENT = "dae-mnist"
DISABLE_ENV = "DAE_TRACKING"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def repo_root(start: str | Path | None = None) -> Path:
    """The user's repository: the nearest folder with `.dvc/`, seen through DVC's temp workspaces."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    # A queued `dvc exp run` executes in <repo>/.dvc/tmp/exps/...; its runs belong to <repo>.
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return path


# Parallel queue workers (`dvc queue start -j 2`) write to one SQLite file: wait up to this many
# seconds for another writer's lock instead of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60


def tracking_uri(root: Path | None = None) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}?timeout={SQLITE_BUSY_TIMEOUT_S}")


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a SQLite store across processes: two queue workers creating
    the tables or the experiment of a new mlflow.db at the same moment would collide."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment_id(mlflow: Any, name: str, artifact_location: str | None) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process (a parallel queue worker) created it first
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in ("off", "0", "false", "no")


def pipeline_tags(root: Path, params_file: str = "params.yaml") -> dict[str, str]:
    """Tags shared by every stage of one pipeline execution, so the UI can filter them together."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    params_hash = hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:12]
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    pipeline_id = hashlib.sha256(f"{commit}|{params_hash}|{exp_name}".encode()).hexdigest()[:12]
    return {"pipeline_id": pipeline_id, "git_commit": commit, "params_hash": params_hash,
            "dvc_exp_name": exp_name}


class StageRun:
    """What a stage logs to; every method is a no-op when tracking is disabled."""

    def __init__(self, mlflow: Any | None, experiment_id: str | None = None) -> None:
        self._mlflow = mlflow
        self._experiment_id = experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self._mlflow and Path(path).exists():
            self._mlflow.log_artifact(str(path))

    @contextmanager
    def seed(self, seed: int, name: str) -> Iterator["StageRun"]:
        """A nested run for one seed of this stage."""
        if not self._mlflow:
            yield self
            return
        parent_tags = self._mlflow.active_run().data.tags
        tags = {k: v for k, v in parent_tags.items() if not k.startswith("mlflow.")}
        with self._mlflow.start_run(experiment_id=self._experiment_id, run_name=f"{name} seed {seed}",
                                    nested=True, tags=tags | {"seed": str(seed)}):
            yield self


@contextmanager
def stage_run(stage: str, params: dict[str, Any], params_file: str = "params.yaml") -> Iterator[StageRun]:
    """Open the MLflow run of one stage; fails fast, before any training, if the store is unusable."""
    if not enabled():
        log.info("tracking disabled (%s=off): nothing is logged to MLflow", DISABLE_ENV)
        yield StageRun(None)
        return
    # An unreachable server should fail in seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    root = repo_root()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    # With the local default store, keep artifacts beside mlflow.db, not in the cwd.
    location = (root / "mlruns").as_uri() if "MLFLOW_TRACKING_URI" not in os.environ else None
    try:
        with _sqlite_init_lock(uri):
            experiment_id = _experiment_id(mlflow, name, location)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(
            f"cannot use the MLflow tracking store {uri}: {type(exc).__name__}: {exc}\n"
            f"Check MLFLOW_TRACKING_URI (is the server running?), or set {DISABLE_ENV}=off "
            "to run without tracking.") from exc
    tags = {**pipeline_tags(root, params_file), "stage": stage}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags):
        mlflow.log_params(params)
        log.info("MLflow: logging stage %s to %s (pipeline_id %s)", stage, uri, tags["pipeline_id"])
        yield StageRun(mlflow, experiment_id)
