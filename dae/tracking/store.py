"""The MLflow store: its URI, the HTTP retry policy, the SQLite lock, and one-line errors."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DISABLE_ENV = "DAE_TRACKING"  # off: nothing is logged to MLflow
# Parallel queue workers (`dvc queue start -j 2`) write to one SQLite file: wait up to this many
# seconds for another writer's lock instead of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60

# Start-up check: one attempt, 10 s, so a wrong URI or a stopped server fails in seconds.
STARTUP_RETRIES, STARTUP_TIMEOUT_S = "0", "10"
# While a stage runs, a lost server is waited for: urllib3 backs off 0, 2, 4, ..., 64 s between
# the attempts (backoff factor 1), about two minutes in all, on connection errors and on
# 429/5xx answers (a server whose database is down). 401/403 are never retried.
RETRIES_WHILE_RUNNING, BACKOFF_FACTOR_WHILE_RUNNING, TIMEOUT_WHILE_RUNNING_S = "7", "1", "120"
RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
             "MLFLOW_HTTP_REQUEST_TIMEOUT")
# The retry settings the user exported before any stage ran: theirs always win.
USER_RETRY_ENV = frozenset(name for name in RETRY_ENV if name in os.environ)


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def tracking_uri(root: Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else SQLite in `root` (default: the working directory)."""
    return (os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}?timeout={SQLITE_BUSY_TIMEOUT_S}")


@contextmanager
def http_policy(retries: str, timeout: str, backoff: str | None = None) -> Iterator[None]:
    """MLflow's HTTP retry settings for a block. MLflow's client reads them from the environment
    on every request, so they are set there, and restored after; blocks nest."""
    saved = {name: os.environ.get(name) for name in RETRY_ENV}
    for name, value in zip(RETRY_ENV, (retries, backoff, timeout)):
        if name not in USER_RETRY_ENV and value is not None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if name in USER_RETRY_ENV:
                continue
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
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


def experiment_id(mlflow: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created if new (by whichever parallel process comes first)."""
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


def refused(exc: Exception, experiment: str) -> str | None:
    """A one-line explanation when an authenticating server (`mlflow server --app-name basic-auth`)
    refused the credentials (HTTP 401) or the permission (403); None for any other failure."""
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
            f"ask its admin for EDIT permission, or set {DISABLE_ENV}=off to run without tracking")


def unusable(exc: Exception, uri: str, experiment: str) -> TrackingError:
    """What a stage says when the store cannot be used at its start: one line, before any training."""
    return TrackingError(refused(exc, experiment) or (
        f"cannot use the MLflow tracking store {uri}: {type(exc).__name__}: {exc}\n"
        f"Check MLFLOW_TRACKING_URI (is the server running?), or set {DISABLE_ENV}=off "
        "to run without tracking."))


def lost(exc: Exception, uri: str, experiment: str) -> TrackingError:
    """What a stage says when the store failed after it started: one line, no traceback."""
    reason = refused(exc, experiment)
    if reason:
        return TrackingError(reason)
    cause = " ".join(str(exc).split())
    if len(cause) > 300:
        cause = cause[:300] + " ..."
    return TrackingError(
        f"lost the MLflow tracking store {uri} while the stage ran, and it did not come back "
        f"within the retries ({type(exc).__name__}: {cause}). The stage's outputs were not "
        "written; once the server is back, `dvc repro` resumes from the last completed epoch.")
