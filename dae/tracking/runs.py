"""A stage's MLflow run, its members' nested runs, and the tags every run of one execution shares."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dae.env import switch
from dae.io import file_digest
from dae.tracking import registry, store

log = logging.getLogger(__name__)


def enabled() -> bool:
    return switch(store.DISABLE_ENV)


def experiment_name(dataset: str) -> str:
    """The MLflow experiment of a dataset's runs: `dae-mnist`, `dae-fashion-mnist`.
    One experiment per dataset, because metrics are only comparable on the same data;
    $MLFLOW_EXPERIMENT_NAME overrides it."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"dae-{dataset}"


def pipeline_tags(params_file: str | Path = "params.yaml") -> dict[str, str]:
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


def _failure_status() -> str:
    """How a run that ends with the exception being handled is marked: KILLED when the stage was
    interrupted (Ctrl-C, SIGTERM: see stages.common.run_stage), FAILED for anything else."""
    return "KILLED" if sys.exc_info()[0] in (KeyboardInterrupt, SystemExit) else "FAILED"


class StageRun:
    """What a stage logs to; every method is a no-op when tracking is disabled."""

    def __init__(self, mlflow: Any | None, experiment_id: str | None = None, tags: dict[str, str] | None = None,
                 experiment: str = "", alias: str | None = None) -> None:
        self.mlflow = mlflow
        self.experiment_id = experiment_id
        self.experiment = experiment
        self.tags = tags or {}  # the pipeline tags shared by every run of this execution
        self.alias = alias      # the registry alias that new versions take (None: none)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a store that failed (after MLflow's retries) into one TrackingError line."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        try:
            yield
        except (MlflowException, RequestException, OSError) as exc:  # a bug of ours keeps its traceback
            raise store.lost(exc, self.mlflow.get_tracking_uri(), self.experiment) from None

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.mlflow:
            with self.guard():
                self.mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.mlflow:
            with self.guard():
                self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self.mlflow and Path(path).exists():
            with self.guard():
                self.mlflow.log_artifact(str(path))

    def run_that_wrote(self, path: str | Path, seed: int) -> str | None:
        """The id of the newest run that trained seed `seed` of this exact file (the member run
        with its `output_md5` tag), even when DVC restored the file from its cache."""
        if not self.mlflow:
            return None
        with self.guard():
            runs = self.mlflow.search_runs([self.experiment_id],
                                           f"tags.output_md5 = '{file_digest(path)}' and tags.seed = '{seed}'",
                                           order_by=["attributes.start_time DESC"], max_results=1,
                                           output_format="list")
        return runs[0].info.run_id if runs else None

    def register(self, model_uri: str | None, name: str, seed: int) -> str | None:
        """A new version of registered model `name` from `model_uri`, tagged with this execution's
        pipeline tags and `seed`; the alias moves onto it when the stage runs in the user's
        workspace. Serialised across processes on a SQLite store (parallel queue workers)."""
        if not self.mlflow or model_uri is None:
            return None
        tags = {k: self.tags[k] for k in ("pipeline_id", "git_commit", "dvc_exp_name", "dataset")}
        with store.sqlite_init_lock(self.mlflow.get_tracking_uri()), self.guard():
            return registry.register(self.mlflow, model_uri, name, tags | {"seed": str(seed)}, self.alias)

    @contextmanager
    def member_runs(self) -> Iterator["MemberRuns"]:
        """The nested runs of the members this stage computes (its seeds, or several models'
        seeds); when the block raises, the runs still open are marked FAILED (KILLED if interrupted)."""
        runs = MemberRuns(self)
        try:
            yield runs
        except BaseException:
            runs.close_all(_failure_status())
            raise


class MemberRuns:
    """One nested run per member, addressed by its run name: `start`, then `log` / `log_model`,
    then `finish`. No-ops when tracking is disabled. `log` may be called from the threads of
    lanes trained side by side (dae.lanes): one call at a time reaches the store."""

    def __init__(self, stage_run: StageRun) -> None:
        self._stage = stage_run
        self._open: dict[str, str] = {}  # run name -> run id
        self._lock = threading.Lock()

    def start(self, name: str, seed: int, tags: dict[str, str] | None = None) -> str:
        """Open the run `name` of one member (seed `seed`); it carries the stage run's own tags
        (not MLflow's system tags), `seed` and `tags`. Returns `name`, its key here."""
        mlflow = self._stage.mlflow
        if not mlflow:
            return name
        from mlflow.tracking.context.registry import resolve_tags

        parent = mlflow.active_run()
        own = {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}
        tags = own | {"seed": str(seed)} | (tags or {}) | {"mlflow.parentRunId": parent.info.run_id}
        with self._stage.guard():
            run = mlflow.MlflowClient().create_run(self._stage.experiment_id, tags=resolve_tags(tags), run_name=name)
        self._open[name] = run.info.run_id
        return name

    def log(self, name: str, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow = self._stage.mlflow
        if mlflow and name in self._open:
            with self._lock, self._stage.guard():
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self._open[name])

    def epoch_logger(self, names: list[str]):
        """An `on_epoch` for dae.train.fit: each member's epoch row to its run, at step = epoch."""
        def on_epoch(rows: list[dict]) -> None:
            for name, row in zip(names, rows):
                self.log(name, row, step=row["epoch"])
        return on_epoch

    def log_model(self, name: str, model_name: str, weights: dict, metrics: dict[str, float],
                  input_example: Any, tags: dict[str, str]) -> str | None:
        """Log member `name`'s model (dae.tracking.registry.log_model) in its run; returns its URI."""
        mlflow = self._stage.mlflow
        if not mlflow or name not in self._open:
            return None
        # MLflow logs a model to the active run: the member's run is made active for it (leaving the
        # block ends it FINISHED; `finish` then records its tags and final status).
        with self._stage.guard(), mlflow.start_run(run_id=self._open[name], nested=True):
            return registry.log_model(mlflow, model_name, weights, metrics, input_example, tags)

    def finish(self, name: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        mlflow = self._stage.mlflow
        if mlflow and name in self._open:
            client = mlflow.MlflowClient()
            with self._stage.guard():
                for key, value in (tags or {}).items():
                    client.set_tag(self._open[name], key, value)
                client.set_terminated(self._open.pop(name), status)

    def finish_trained(self, names: list[str], results: list, model_path: str | Path) -> None:
        """Close the member runs of a training stage that wrote `model_path`: each gets its best
        epoch and the file's MD5 as a tag (evaluate links each logged model to the run that trained it)."""
        md5 = file_digest(model_path) if self._stage.mlflow else ""
        for name, result in zip(names, results):
            self.log(name, {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
            self.finish(name, tags={"output_md5": md5})

    def close_all(self, status: str) -> None:
        """Best effort: a store that is gone must not replace the stage's own error."""
        with store.http_policy(store.STARTUP_RETRIES, store.STARTUP_TIMEOUT_S):
            for name in list(self._open):
                try:
                    self.finish(name, status)
                except Exception:  # noqa: BLE001
                    log.warning("MLflow: could not mark the run %s %s (the store is unreachable)", name, status)
                    self._open.pop(name, None)


def dataset_inputs(data_params: dict, noise_params: dict, splits: list[str]) -> list[dict[str, str]]:
    """The splits a stage reads, as its MLflow run records them: name (`mnist-train`), split, and
    a digest of what makes them these images: the original files' SHA-256 checksums, the split
    params and the noise params. Runs with equal digests saw equal data."""
    from dae.data import DATASETS

    spec = DATASETS[data_params["dataset"]]
    source = next(m for m in spec.mirrors if m.startswith("http"))
    inputs = []
    for split in splits:
        recipe = {"sha256": spec.sha256, "data": data_params, "noise": noise_params, "split": split}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        inputs.append({"name": f"{spec.name}-{split}", "split": split, "digest": digest, "source": source})
    return inputs


def _log_inputs(mlflow: Any, inputs: list[dict[str, str]]) -> None:
    """Record each data set the run reads as an MLflow dataset input (the UI's Datasets column)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    for spec in inputs:
        dataset = MetaDataset(HTTPDatasetSource(spec["source"]), name=spec["name"], digest=spec["digest"])
        mlflow.log_input(dataset, context=spec["split"])


@contextmanager
def stage_run(stage: str, params: dict[str, Any], root: str | Path | None = None, move_alias: bool = True,
              inputs: list[dict[str, str]] | None = None, params_file: str | Path = "params.yaml"
              ) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; fails fast, before any training, if the store is unusable.

    `root`: where the default SQLite store (mlflow.db) and its artifacts (mlruns/) live (default:
    the working directory). `move_alias`: registered versions take the alias `current`.
    `inputs`: the data sets it reads ({name, split, digest, source}), logged as dataset inputs."""
    if not enabled():
        log.info("tracking disabled (%s=off): nothing is logged to MLflow", store.DISABLE_ENV)
        yield StageRun(None)
        return
    import mlflow

    # MLflow's artifact progress bars (one per file as log_model checks its input example) are
    # noise in a stage's log; a user's own setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = Path(root or Path.cwd()).resolve()
    uri = store.tracking_uri(root)
    # With the local default store, keep artifacts beside mlflow.db, not in the cwd (a queued
    # experiment's cwd is a temporary copy that DVC deletes). Decided before set_tracking_uri,
    # which exports MLFLOW_TRACKING_URI.
    location = (root / "mlruns").as_uri() if "MLFLOW_TRACKING_URI" not in os.environ else None
    mlflow.set_tracking_uri(uri)
    tags = {**pipeline_tags(params_file), "stage": stage}
    name = experiment_name(tags["dataset"])
    try:
        with store.http_policy(store.STARTUP_RETRIES, store.STARTUP_TIMEOUT_S), store.sqlite_init_lock(uri):
            experiment_id = store.experiment_id(mlflow, name, location)
            # System metrics (CPU, memory; GPU with nvidia-ml-py): the run's "System metrics" tab.
            mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags, log_system_metrics=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise store.unusable(exc, uri, name) from None
    run = StageRun(mlflow, experiment_id, tags, name, registry.CURRENT_ALIAS if move_alias else None)
    with store.http_policy(store.RETRIES_WHILE_RUNNING, store.TIMEOUT_WHILE_RUNNING_S,
                           store.BACKOFF_FACTOR_WHILE_RUNNING), _ending(run):
        with run.guard():
            mlflow.log_params(params)
            _log_inputs(mlflow, inputs or [])
        log.info("MLflow: logging stage %s to %s (pipeline_id %s)", stage, uri, tags["pipeline_id"])
        yield run


@contextmanager
def _ending(run: StageRun) -> Iterator[None]:
    """End the active run: FINISHED, or FAILED/KILLED (best effort) when the block raised. A store
    that is gone must not replace the stage's own error with a traceback from end_run."""
    try:
        yield
    except BaseException:
        status = _failure_status()
        with store.http_policy(store.STARTUP_RETRIES, store.STARTUP_TIMEOUT_S):
            try:
                run.mlflow.end_run(status)
            except Exception:  # noqa: BLE001 - the stage's own error is the one to report
                log.warning("MLflow: could not mark the run %s (the store is unreachable)", status)
        raise
    with run.guard():
        run.mlflow.end_run()
