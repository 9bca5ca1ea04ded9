"""The team server for the integration tests and the load benchmark: an `mlflow server` (with the
basic-auth app on PostgreSQL) on loopback, users made as README's team setup makes them, N queued
experiments run by J DVC queue workers, and the audit of the store against what their params say
must be there. Used by tests/test_server.py, tests/test_server_faults.py and bench/load_test.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dae.params import DEEP_LAYERS, MODELS, TRAINED_MODELS
from dae.report import BASELINES

ROOT = Path(__file__).resolve().parents[1]

TRACKED_STAGES = [f"pretrain_layer@{k}" for k in range(1, DEEP_LAYERS + 1)] + ["finetune", "evaluate", "figures"]
EPOCH_KEYS = ("epoch", "train_loss", "val_loss", "lr")          # fit()'s per-epoch row
CLASSIFIER_KEYS = ("classifier_train_loss", "classifier_val_loss", "classifier_lr")
TEST_METRICS = ("mse", "mse_noisy", "accuracy", "accuracy_noisy")
SUMMARY_STATS = ("", "_std")                                   # evaluate's mean and std over seeds
FIGURE_ARTIFACTS = 7                                           # six figures and index.md


# --- A tracking server for the load test and the integration tests --------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_database(base_uri: str, name: str) -> str:
    """Create (or recreate) database `name` on the server of `base_uri`; its URI."""
    import psycopg

    conninfo = base_uri.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return base_uri.rsplit("/", 1)[0] + "/" + name


@dataclass
class TrackingServer:
    """`mlflow server` on loopback; with `auth_db`, the basic-auth app (admin: `admin`)."""
    backend: str
    artifacts: Path
    log_path: Path
    auth_db: str | None = None
    port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    auth_cache_seconds: int = 60
    process: subprocess.Popen | None = None

    @classmethod
    def authenticated(cls, postgres: str, folder: Path, prefix: str) -> "TrackingServer":
        """A basic-auth server (not started) on two fresh databases, `<prefix>_<tag>` for the runs
        and `<prefix>_auth_<tag>` for the users, artifacts and log in `folder`."""
        tag = secrets.token_hex(3)
        return cls(fresh_database(postgres, f"{prefix}_{tag}"), folder / "artifacts", folder / "mlflow-server.log",
                   auth_db=fresh_database(postgres, f"{prefix}_auth_{tag}"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        env = dict(os.environ)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                   "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "2"]
        if self.auth_db:
            ini = self.log_path.with_name("basic_auth.ini")
            ini.write_text("[mlflow]\ndefault_permission = READ\n"
                           f"database_uri = {self.auth_db}\nadmin_username = admin\n"
                           f"auth_cache_ttl_seconds = {self.auth_cache_seconds}\n")
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
            command += ["--app-name", "basic-auth"]
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        log = self.log_path.open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not come up:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def errors(self) -> list[str]:
        """Lines of the server's log that report a failure: tracebacks and 5xx answers."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if "Traceback" in line or re.search(r'HTTP/1\.[01]" 5\d\d', line)]

    def admin_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


def team_user(server: TrackingServer, name: str, edit: bool, experiment: str = "dae-mnist") -> str:
    """Set up the experiment and its models (once) and add a user, as README's team setup does
    with `python -m dae.team`; returns the user's password."""
    env = {**os.environ, **server.admin_env(), "MLFLOW_EXPERIMENT_NAME": experiment}
    team = [sys.executable, "-m", "dae.team"]
    subprocess.run(team + ["setup"], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    out = subprocess.run(team + ["add-user", name] + (["--edit"] if edit else []), env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return out.rsplit("shown once: ", 1)[1].strip()


# --- What must be in the store ---------------------------------------------------------------

def epochs_of(section: dict, model: str) -> int:
    epochs = section["epochs"]
    return epochs[model] if isinstance(epochs, dict) else epochs


def expected_items(params: dict) -> Counter:
    """Every item one pipeline execution with these params logs, counted: runs per stage,
    metric points per (stage, key), artifacts per stage, logged and registered models."""
    seeds = len(params["seeds"])
    want: Counter = Counter()
    for stage in TRACKED_STAGES:
        want[("run", stage, "parent")] += 1
    for k in range(1, DEEP_LAYERS + 1):
        stage = f"pretrain_layer@{k}"
        want[("run", stage, "seed")] += seeds
        for key in EPOCH_KEYS:
            want[("metric", stage, key)] += seeds * params["pretrain"]["epochs"]
        for key in ("best_val_loss", "best_epoch"):
            want[("metric", stage, key)] += seeds
        want[("artifact", stage)] += 1                                  # the loss curve
    stage = "finetune"  # one nested run per model and seed
    for model in MODELS:
        want[("run", stage, "seed")] += seeds
        want[("artifact", stage)] += 1                                  # the model's loss curve
        if model in TRAINED_MODELS:
            for key in EPOCH_KEYS:
                want[("metric", stage, key)] += seeds * epochs_of(params["finetune"], model)
        for key in ("best_val_loss", "best_epoch"):                     # greedy's: epoch 0
            want[("metric", stage, key)] += seeds
    want[("run", "evaluate", "seed")] += len(MODELS) * seeds
    for key in CLASSIFIER_KEYS:
        want[("metric", "evaluate", key)] += len(MODELS) * seeds * params["classifier"]["epochs"]
    for key in TEST_METRICS:
        # logged on the seed's run, and attached to its logged model (log_metrics(model_id=...))
        want[("metric", "evaluate", key)] += 2 * len(MODELS) * seeds
        for model in [*MODELS, *BASELINES]:  # the baselines' rows: on the stage run only
            for stat in SUMMARY_STATS:
                want[("metric", "evaluate", f"{model}.{key}{stat}")] += 1
    want[("artifact", "evaluate")] += 3                                 # metrics.json, results.*
    want[("logged_model", "evaluate")] += len(MODELS) * seeds
    want[("logged_model_files", "evaluate")] += len(MODELS) * seeds
    want[("model_version", "evaluate")] += len(MODELS)                  # the first seed's
    want[("artifact", "figures")] += FIGURE_ARTIFACTS
    return want


def found_items(client, experiment_id: str, exp_name: str) -> tuple[Counter, list[str]]:
    """The same items as they are in the store, for the DVC experiment `exp_name`; and the runs
    that did not finish."""
    got: Counter = Counter()
    unfinished = []
    runs = client.search_runs([experiment_id], f"tags.dvc_exp_name = '{exp_name}'", max_results=5000)
    for run in runs:
        stage = run.data.tags.get("stage", "?")
        nested = "mlflow.parentRunId" in run.data.tags
        got[("run", stage, "seed" if nested else "parent")] += 1
        if run.info.status != "FINISHED":
            unfinished.append(f"{stage} {run.info.run_name}: {run.info.status}")
        for key in run.data.metrics:
            if key.startswith("system/"):  # MLflow's samples of CPU and memory: as many as the run lasted
                continue
            history = client.get_metric_history(run.info.run_id, key)
            got[("metric", stage, key)] += len(history)
        if not nested:
            got[("artifact", stage)] += sum(1 for a in client.list_artifacts(run.info.run_id) if not a.is_dir)
        elif stage == "evaluate":
            models = client.search_logged_models([experiment_id],
                                                 filter_string=f"source_run_id = '{run.info.run_id}'")
            got[("logged_model", stage)] += len(models)
            # ... with its files (MLmodel, the code, the weights) where the store keeps them
            got[("logged_model_files", stage)] += sum(
                {"MLmodel", "artifacts", "code"} <= {Path(f.path).name for f in
                                                    client.list_logged_model_artifacts(m.model_id)}
                for m in models)
    for model in MODELS:
        for version in client.search_model_versions(f"name = 'dae-mnist-{model}'"):
            if version.tags.get("dvc_exp_name") == exp_name:
                got[("model_version", "evaluate")] += 1
    return got, unfinished


def expected_runs(params: dict) -> int:
    """How many MLflow runs one pipeline execution with these params makes."""
    return sum(n for item, n in expected_items(params).items() if item[0] == "run")


@dataclass
class Audit:
    runs: int = 0
    metric_points: int = 0
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)


def audit(client, experiment: str, executions: dict[str, dict]) -> Audit:
    """Compare the store with `executions` ({DVC experiment name: its params}), item by item."""
    found_experiment = client.get_experiment_by_name(experiment)
    result = Audit()
    for name, params in executions.items():
        want = expected_items(params)
        got, unfinished = (found_items(client, found_experiment.experiment_id, name)
                           if found_experiment else (Counter(), []))
        result.runs += sum(n for item, n in got.items() if item[0] == "run")
        result.metric_points += sum(n for item, n in got.items() if item[0] == "metric")
        result.lost += len(unfinished)
        result.problems += [f"{name}: {u}" for u in unfinished]
        for item in sorted(set(want) | set(got), key=str):
            if got[item] < want[item]:
                result.lost += want[item] - got[item]
                result.problems.append(f"{name}: {item} lost {want[item] - got[item]} of {want[item]}")
            elif got[item] > want[item]:
                result.duplicated += got[item] - want[item]
                result.problems.append(f"{name}: {item} {got[item] - want[item]} more than {want[item]}")
    return result


# --- Queue N experiments, run them with J workers --------------------------------------------

def experiment_overrides(i: int) -> list[str]:
    """The i-th experiment: its own noise level and seed, so that no two are alike."""
    return ["-S", f"noise.level={0.1 + 0.05 * (i % 8):.2f}", "-S", f"seeds=[{i}]"]


def run_queue(run, n: int, workers: int, timeout: float) -> tuple[dict[str, str], float]:
    """Queue n experiments (`load-<i>`), start `workers` queue workers, wait; their states
    ({name: Success|Failed|...}) and the wall time from `dvc queue start` to the last one."""
    for i in range(n):
        run(sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", f"load-{i}", *experiment_overrides(i))
    start = time.monotonic()
    run(sys.executable, "-m", "dvc", "queue", "start", "-j", str(workers))
    while True:
        status = run(sys.executable, "-m", "dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        if time.monotonic() - start > timeout:
            run(sys.executable, "-m", "dvc", "queue", "kill", *[f"load-{i}" for i in range(n)], check=False)
            break
        time.sleep(3)
    seconds = time.monotonic() - start
    states = dict(re.findall(r"^\S+\s+(load-\d+)\s+.*?\b(Success|Failed|Queued|Running|Killed|Unknown)\s*$",
                             status, re.MULTILINE))
    return {f"load-{i}": states.get(f"load-{i}", "missing") for i in range(n)}, seconds


def executions_params(ws: Path, n: int) -> dict[str, dict]:
    """The params each queued experiment ran with: the workspace's, with its overrides."""
    import yaml

    base = yaml.safe_load((ws / "params.yaml").read_text())
    result = {}
    for i in range(n):
        params = json.loads(json.dumps(base))
        overrides = dict(arg.split("=", 1) for arg in experiment_overrides(i)[1::2])
        params["noise"]["level"] = float(overrides["noise.level"])
        params["seeds"] = yaml.safe_load(overrides["seeds"])
        result[f"load-{i}"] = params
    return result
