"""MLflow tracking: one run per pipeline stage, a nested run per seed, shared pipeline tags.

The default store is SQLite at the repository root (`mlflow.db`, artifacts in `mlruns/`),
resolved to absolute paths so runs land there from any working directory, including DVC's
temporary experiment workspaces under `.dvc/tmp/exps/`. `MLFLOW_TRACKING_URI` overrides it
(e.g. a tracking server); `DAE_TRACKING=off` disables tracking for offline work.

A tracking server that is unreachable, or refuses the user, stops a stage at its start, before
any training, with one line. A server (or its database) that goes away while a stage trains is
waited for: MLflow's client retries each request with exponential backoff for about two minutes
(RETRIES_WHILE_RUNNING); if it is still gone, the stage stops with one line before it writes its
outputs, and `dvc repro` resumes from the last completed epoch once the server is back.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

DISABLE_ENV = "DAE_TRACKING"
# The registry alias of the version from the workspace's latest `dvc repro` (queued and temporary
# experiments register versions too, but never move it).
CURRENT_ALIAS = "current"
SERVING_CODE = Path(__file__).with_name("serving.py")   # the pyfunc model (models from code)
MODEL_CODE = Path(__file__).with_name("model.py")       # travels with it as dae_tied_autoencoder.py


def experiment_name(dataset: str) -> str:
    """The MLflow experiment of a dataset's runs: `dae-mnist`, `dae-fashion-mnist`.
    One experiment per dataset, because metrics are only comparable on the same data;
    $MLFLOW_EXPERIMENT_NAME overrides it."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"dae-{dataset}"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


# Start-up check: one attempt, 10 s, so a wrong URI or a stopped server fails in seconds.
STARTUP_RETRIES, STARTUP_TIMEOUT_S = "0", "10"
# While a stage runs, a lost server is waited for: urllib3 backs off 0, 2, 4, ..., 64 s between
# the attempts (backoff factor 1), about two minutes in all, on connection errors and on
# 429/5xx answers (a server whose database is down). 401/403 are never retried.
RETRIES_WHILE_RUNNING, BACKOFF_FACTOR_WHILE_RUNNING, TIMEOUT_WHILE_RUNNING_S = "7", "1", "120"
_RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_TIMEOUT")


_user_http_env: set[str] | None = None  # the retry settings the user set before any stage ran


@contextmanager
def _http_policy(retries: str, timeout: str, backoff: str | None = None) -> Iterator[None]:
    """MLflow's HTTP retry settings for a block (its client reads them on every request); the
    ones the user set in the environment win. Blocks nest."""
    global _user_http_env
    if _user_http_env is None:
        _user_http_env = {name for name in _RETRY_ENV if name in os.environ}
    saved = {name: os.environ.get(name) for name in _RETRY_ENV}
    for name, value in zip(_RETRY_ENV, (retries, backoff, timeout)):
        if name not in _user_http_env and value is not None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if name in _user_http_env:
                continue
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _lost(exc: Exception, uri: str, experiment: str) -> TrackingError:
    """What a stage says when the store failed after it started: one line, no traceback."""
    refused = _refused(exc, experiment)
    if refused:
        return TrackingError(refused)
    cause = " ".join(str(exc).split())
    if len(cause) > 300:
        cause = cause[:300] + " ..."
    return TrackingError(
        f"lost the MLflow tracking store {uri} while the stage ran, and it did not come back "
        f"within the retries ({type(exc).__name__}: {cause}). The stage's outputs were not "
        "written; once the server is back, `dvc repro` resumes from the last completed epoch.")


def _temp_workspace_at(parts: tuple[str, ...]) -> int | None:
    """Where <repo>/.dvc/tmp/exps/... starts in a path: queued and --temp experiments run there."""
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return i
    return None


def in_workspace(start: str | Path | None = None) -> bool:
    """True in the user's own workspace, False in a queued or temporary experiment's copy."""
    return _temp_workspace_at(Path(start or os.getcwd()).resolve().parts) is None


def repo_root(start: str | Path | None = None) -> Path:
    """The user's repository: the nearest folder with `.dvc/`, seen through DVC's temp workspaces."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    # A queued `dvc exp run` executes in <repo>/.dvc/tmp/exps/...; its runs belong to <repo>.
    at = _temp_workspace_at(parts)
    if at is not None:
        return Path(*parts[:at])
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


def file_md5(path: Path) -> str:
    """The MD5 of a file, as dvc.lock records it."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def registered_model_name(dataset: str, model: str) -> str:
    """The Model Registry name of one of the four models: `dae-mnist-greedy_ft`."""
    return f"dae-{dataset}-{model}"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in ("off", "0", "false", "no")


def pipeline_tags(root: Path, params_file: str = "params.yaml") -> dict[str, str]:
    """Tags shared by every stage of one pipeline execution, so the UI can filter them together:
    pipeline_id, git_commit, params_hash, dvc_exp_name and dataset."""
    import yaml

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    params_text = Path(params_file).read_bytes()
    params_hash = hashlib.sha256(params_text).hexdigest()[:12]
    dataset = (yaml.safe_load(params_text).get("data") or {}).get("dataset", "mnist")
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    pipeline_id = hashlib.sha256(f"{commit}|{params_hash}|{exp_name}".encode()).hexdigest()[:12]
    return {"pipeline_id": pipeline_id, "git_commit": commit, "params_hash": params_hash,
            "dvc_exp_name": exp_name, "dataset": dataset}


class StageRun:
    """What a stage logs to; every method is a no-op when tracking is disabled."""

    def __init__(self, mlflow: Any | None, experiment_id: str | None = None,
                 tags: dict[str, str] | None = None, experiment: str = "") -> None:
        self._mlflow = mlflow
        self._experiment_id = experiment_id
        self._experiment = experiment
        self.tags = tags or {}  # the pipeline tags shared by every run of this execution

    @contextmanager
    def _store(self) -> Iterator[None]:
        """Turn a store that failed (after MLflow's retries) into one TrackingError line."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        try:
            yield
        except (MlflowException, RequestException, OSError) as exc:  # a bug of ours keeps its traceback
            raise _lost(exc, self._mlflow.get_tracking_uri(), self._experiment) from None

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow:
            with self._store():
                self._mlflow.set_tags(tags)

    def run_that_wrote(self, path: Path, seed: int) -> str | None:
        """The id of the newest run that trained seed `seed` of this exact file (the member run
        with its `output_md5` tag), even when DVC restored the file from its cache."""
        if not self._mlflow:
            return None
        md5 = file_md5(path)
        with self._store():
            runs = self._mlflow.search_runs([self._experiment_id],
                                            f"tags.output_md5 = '{md5}' and tags.seed = '{seed}'",
                                            order_by=["attributes.start_time DESC"], max_results=1,
                                            output_format="list")
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            with self._store():
                self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self._mlflow and Path(path).exists():
            with self._store():
                self._mlflow.log_artifact(str(path))

    def log_model(self, name: str, weights: dict, metrics: dict[str, float], input_example: Any,
                  tags: dict[str, str]) -> str | None:
        """Log a trained denoiser as an MLflow model (dae/serving.py) from the active run, with its
        signature, an input example and `metrics` attached; returns its models:/ URI."""
        if not self._mlflow:
            return None
        import tempfile

        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 784))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),  # 784, or the code size
            params=ParamSchema([ParamSpec("output", "string", "reconstruction")]))
        with tempfile.TemporaryDirectory() as tmp, self._store():
            torch.save(weights, Path(tmp) / "weights.pt")
            code = Path(tmp) / "dae_tied_autoencoder.py"
            code.write_text(MODEL_CODE.read_text())
            info = self._mlflow.pyfunc.log_model(
                name=name, python_model=str(SERVING_CODE), artifacts={"weights": str(Path(tmp) / "weights.pt")},
                code_paths=[str(code)], signature=signature, input_example=input_example, tags=tags,
                # Pinned here rather than inferred: inference loads the model in a subprocess (slow).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                                  f"mlflow=={self._mlflow.__version__}"])
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
        return info.model_uri

    def register(self, model_uri: str | None, name: str, seed: int) -> str | None:
        """A new version of registered model `name` from `model_uri`, tagged with this execution's
        pipeline tags and `seed`. In the user's workspace (not in a queued or temporary
        experiment) the alias CURRENT_ALIAS moves onto it. Serialised across processes on a
        SQLite store (parallel queue workers)."""
        if not self._mlflow or model_uri is None:
            return None
        tags = {k: self.tags[k] for k in ("pipeline_id", "git_commit", "dvc_exp_name", "dataset")}
        tags |= {"seed": str(seed)}
        alias = CURRENT_ALIAS if in_workspace() else None
        with _sqlite_init_lock(self._mlflow.get_tracking_uri()), self._store():
            version = self._mlflow.register_model(model_uri, name, tags=tags)
            if alias:
                self._mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
        log.info("MLflow: registered %s version %s%s", name, version.version, f" @{alias}" if alias else "")
        return str(version.version)

    def seed_tags(self, seed: int) -> dict[str, str]:
        """A seed's run carries its stage run's own tags (not MLflow's system tags) and `seed`."""
        tags = self._mlflow.active_run().data.tags
        return {k: v for k, v in tags.items() if not k.startswith("mlflow.")} | {"seed": str(seed)}

    @contextmanager
    def seed(self, seed: int, name: str) -> Iterator["StageRun"]:
        """A nested run for one seed of this stage."""
        if not self._mlflow:
            yield self
            return
        with self._store():
            self._mlflow.start_run(experiment_id=self._experiment_id, run_name=f"{name} seed {seed}",
                                   nested=True, tags=self.seed_tags(seed))
        with _ending(self):
            yield self

    @contextmanager
    def member_runs(self) -> Iterator["MemberRuns"]:
        """Nested runs for the members that one stage trains at the same time (its seeds, or
        several models' seeds), each opened with `start(name, tags)`, logged to with
        `log(name, ...)` and closed with `finish(name)`; when the block raises, the runs still
        open are marked FAILED (KILLED if interrupted)."""
        runs = MemberRuns(self)
        try:
            yield runs
        except BaseException:
            runs.close_all("KILLED" if sys.exc_info()[0] in (KeyboardInterrupt, SystemExit) else "FAILED")
            raise


class MemberRuns:
    """The nested runs of one stage run's members, addressed by run name (see
    StageRun.member_runs); no-ops when tracking is disabled."""

    def __init__(self, stage_run: StageRun) -> None:
        self._stage_run = stage_run
        self._open: dict[str, str] = {}  # run name -> run id

    def start(self, name: str, seed: int, tags: dict[str, str] | None = None) -> str:
        """Open the run `name` of one member (seed `seed`); returns `name`, its key here."""
        mlflow = self._stage_run._mlflow
        if not mlflow:
            return name
        from mlflow.tracking.context.registry import resolve_tags

        tags = (self._stage_run.seed_tags(seed) | (tags or {})
                | {"mlflow.parentRunId": mlflow.active_run().info.run_id})
        with self._stage_run._store():
            run = mlflow.MlflowClient().create_run(
                self._stage_run._experiment_id, tags=resolve_tags(tags), run_name=name)
        self._open[name] = run.info.run_id
        return name

    def log(self, name: str, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow = self._stage_run._mlflow
        if mlflow and name in self._open:
            with self._stage_run._store():
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step,
                                   run_id=self._open[name])

    def epoch_logger(self, names: list[str]):
        """An `on_epoch` for dae.train.fit: each member's epoch row to its run, at step = epoch."""
        def on_epoch(rows: list[dict]) -> None:
            for name, row in zip(names, rows):
                self.log(name, row, step=row["epoch"])
        return on_epoch

    def finish(self, name: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        mlflow = self._stage_run._mlflow
        if mlflow and name in self._open:
            client = mlflow.MlflowClient()
            with self._stage_run._store():
                for key, value in (tags or {}).items():
                    client.set_tag(self._open[name], key, value)
                client.set_terminated(self._open.pop(name), status)

    def close_all(self, status: str) -> None:
        """Best effort: a store that is gone must not replace the stage's own error."""
        with _http_policy(STARTUP_RETRIES, STARTUP_TIMEOUT_S):
            for name in list(self._open):
                try:
                    self.finish(name, status)
                except Exception:  # noqa: BLE001
                    log.warning("MLflow: could not mark the run %s %s (the store is unreachable)", name, status)
                    self._open.pop(name, None)


def _refused(exc: Exception, experiment: str) -> str | None:
    """A one-line explanation when an authenticating server (`mlflow server --app-name basic-auth`)
    refused the credentials (HTTP 401) or the permission (403); None for any other failure."""
    import re

    # MLflow's wording: "... failed with error code 401 != 200" (a plain-text answer), or the error
    # code of a JSON one.
    text = f"{getattr(exc, 'error_code', '')} {exc}"
    status = re.search(r"error code (401|403)\b|\b(UNAUTHENTICATED|PERMISSION_DENIED)\b", text)
    if not status:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user {user!r}" if user else "an anonymous client (MLFLOW_TRACKING_USERNAME is not set)"
    if status.group(1) == "401" or status.group(2) == "UNAUTHENTICATED":
        return (f"the tracking server refused {who} (HTTP 401): check MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD")
    return (f"the tracking server does not let {who} write to experiment {experiment!r} (HTTP 403): "
            "ask its admin for EDIT permission, or set DAE_TRACKING=off to run without tracking")


def _log_inputs(mlflow: Any, inputs: list[dict[str, str]]) -> None:
    """Record each data set the run reads as an MLflow dataset input (the UI's Datasets column)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    for spec in inputs:
        dataset = MetaDataset(HTTPDatasetSource(spec["source"]), name=spec["name"], digest=spec["digest"])
        mlflow.log_input(dataset, context=spec["split"])


@contextmanager
def stage_run(stage: str, params: dict[str, Any], params_file: str = "params.yaml",
              inputs: list[dict[str, str]] | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; fails fast, before any training, if the store is unusable.
    `inputs`: the data sets it reads ({name, split, digest, source}), logged as dataset inputs."""
    if not enabled():
        log.info("tracking disabled (%s=off): nothing is logged to MLflow", DISABLE_ENV)
        yield StageRun(None)
        return
    import mlflow

    # MLflow's artifact progress bars (one per file as log_model checks its input example) are
    # noise in a stage's log; a user's own setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = repo_root()
    uri = tracking_uri(root)
    # With the local default store, keep artifacts beside mlflow.db, not in the cwd (a queued
    # experiment's cwd is a temporary copy that DVC deletes). Decided before set_tracking_uri,
    # which exports MLFLOW_TRACKING_URI.
    location = (root / "mlruns").as_uri() if "MLFLOW_TRACKING_URI" not in os.environ else None
    mlflow.set_tracking_uri(uri)
    tags = {**pipeline_tags(root, params_file), "stage": stage}
    name = experiment_name(tags["dataset"])
    try:
        with _http_policy(STARTUP_RETRIES, STARTUP_TIMEOUT_S), _sqlite_init_lock(uri):
            experiment_id = _experiment_id(mlflow, name, location)
            # System metrics (CPU, memory; GPU with nvidia-ml-py): the run's "System metrics" tab.
            mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags, log_system_metrics=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(_refused(exc, name) or (
            f"cannot use the MLflow tracking store {uri}: {type(exc).__name__}: {exc}\n"
            f"Check MLFLOW_TRACKING_URI (is the server running?), or set {DISABLE_ENV}=off "
            "to run without tracking.")) from None
    run = StageRun(mlflow, experiment_id, tags, name)
    with _http_policy(RETRIES_WHILE_RUNNING, TIMEOUT_WHILE_RUNNING_S, BACKOFF_FACTOR_WHILE_RUNNING), \
            _ending(run):
        with run._store():
            mlflow.log_params(params)
            _log_inputs(mlflow, inputs or [])
        log.info("MLflow: logging stage %s to %s (pipeline_id %s)", stage, uri, tags["pipeline_id"])
        yield run


@contextmanager
def _ending(run: StageRun) -> Iterator[None]:
    """End the active run: FINISHED, or FAILED (best effort) when the block raised. A store that
    is gone must not replace the stage's own error with a traceback from end_run."""
    mlflow = run._mlflow
    try:
        yield
    except BaseException:
        status = "KILLED" if sys.exc_info()[0] in (KeyboardInterrupt, SystemExit) else "FAILED"
        with _http_policy(STARTUP_RETRIES, STARTUP_TIMEOUT_S):
            try:
                mlflow.end_run(status)
            except Exception:  # noqa: BLE001 - the stage's own error is the one to report
                log.warning("MLflow: could not mark the run %s (the store is unreachable)", status)
        raise
    with run._store():
        mlflow.end_run()
