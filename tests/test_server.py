"""Integration: README's team setup — an authenticated `mlflow server --app-name basic-auth` on
PostgreSQL with a shared artifact store, users made with `python -m dae.team`, six queued
experiments run by three parallel workers (`dvc queue start -j 3`) and audited item by item, a
DVC remote, and experiments shared between two clones through a git remote.

Needs PostgreSQL: `DAE_TEST_POSTGRES_URI` (postgresql+psycopg://user:password@127.0.0.1/db, a role
that may create databases; each module makes fresh ones). `.ci/run` installs PostgreSQL from
Debian's packages, starts it on loopback and sets the variable (with DAE_REQUIRE_SERVER_TEST=1,
so CI fails rather than skips); elsewhere the test is skipped. Everything talks to 127.0.0.1.
"""
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from tests.team_server import TrackingServer, audit, executions_params, expected_runs, run_queue, team_user
from tests.workspace import make_workspace, runner

N_EXPERIMENTS, WORKERS = 6, 3   # the CI-sized load test (bench/load_test.py: 16 and 4)


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    """The basic-auth tracking server on fresh PostgreSQL databases (runs, and users)."""
    srv = TrackingServer.authenticated(postgres_uri, tmp_path_factory.mktemp("server"), "dae_test")
    srv.auth_cache_seconds = 5  # short, so that the password-rotation test need not wait long
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def users(server) -> dict[str, str]:
    """A teammate with EDIT permission and a read-only viewer: {name: password}."""
    return {"alice": team_user(server, "alice", edit=True), "viewer": team_user(server, "viewer", edit=False)}


def as_user(server, name: str | None, password: str | None = None) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": server.url}
    if name:
        env |= {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}
    return env


def http_status(server, path: str, body: dict, user: tuple[str, str] | None) -> int:
    request = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if user:
        request.add_header("Authorization", "Basic " + b64encode(":".join(user).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_anonymous_clients_and_wrong_passwords_are_refused(server, users):
    search = ("/api/2.0/mlflow/runs/search", {"experiment_ids": ["0"]})
    log = ("/api/2.0/mlflow/runs/create", {"experiment_id": "0"})
    for path, body in (search, log):
        assert http_status(server, path, body, None) == 401
        assert http_status(server, path, body, ("alice", "not-her-password")) == 401
        assert http_status(server, path, body, ("mallory", users["alice"])) == 401
    assert http_status(server, *search, ("viewer", users["viewer"])) == 200
    assert http_status(server, *search, ("alice", users["alice"])) == 200


def test_a_wrong_password_stops_a_stage_at_its_start(server, users, mnist_mirror, tmp_path):
    run = make_workspace(tmp_path, mnist_mirror, as_user(server, "alice", "not-her-password"))
    result = run(sys.executable, "-m", "dvc", "repro", check=False)
    assert result.returncode != 0
    assert ("ERROR in stage pretrain_layer@1: the tracking server refused user 'alice' (HTTP 401): "
            "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") in result.stderr
    assert "Traceback" not in result.stderr and "epoch 1/" not in result.stderr
    assert not (tmp_path / "data" / "models").exists() and not (tmp_path / "reports").exists()


def test_a_read_only_user_can_search_but_its_run_fails_fast_and_writes_nothing(server, users, mnist_mirror,
                                                                            tmp_path):
    from mlflow import MlflowClient

    os.environ.update(as_user(server, "viewer", users["viewer"]))
    try:
        assert MlflowClient(server.url).get_experiment_by_name("dae-mnist") is not None
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)
    run = make_workspace(tmp_path, mnist_mirror, as_user(server, "viewer", users["viewer"]))
    result = run(sys.executable, "-m", "dvc", "repro", check=False)
    assert result.returncode != 0
    # download and noise do not log to MLflow; the first stage that does stops before training.
    assert ("ERROR in stage pretrain_layer@1: the tracking server does not let user 'viewer' write to "
            "experiment 'dae-mnist' (HTTP 403)") in result.stderr
    assert "Traceback" not in result.stderr and "epoch 1/" not in result.stderr
    assert not (tmp_path / "data" / "models").exists() and not (tmp_path / "data" / "checkpoints").exists()
    assert not (tmp_path / "reports").exists()


@pytest.fixture(scope="module")
def queued_experiments(server, users, mnist_mirror, tmp_path_factory):
    """Six `dvc exp run --queue` tiny-profile experiments by alice, run by three workers."""
    ws = tmp_path_factory.mktemp("team-repo")
    run = make_workspace(ws, mnist_mirror, as_user(server, "alice", users["alice"]) | {"OMP_NUM_THREADS": "1"})
    run(sys.executable, "-m", "dvc", "repro", "noise")  # the data once, before the queue copies it
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "data")
    states, seconds = run_queue(run, N_EXPERIMENTS, WORKERS, timeout=2400)
    logs = {name: run(sys.executable, "-m", "dvc", "queue", "logs", name, check=False).stdout for name in states}
    assert set(states.values()) == {"Success"}, f"{states}\n" + "\n".join(logs.values())
    return ws, run, logs


@pytest.fixture(scope="module")
def admin_client(server):
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update({k: v for k, v in server.admin_env().items() if k != "MLFLOW_TRACKING_URI"})
    yield MlflowClient(server.url)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_under_load_nothing_is_lost_or_duplicated(server, queued_experiments, admin_client):
    """Every run FINISHED, every metric point, artifact, logged model and registry version the
    params call for, exactly once; no failed worker; no error in the server's log."""
    ws, _, _ = queued_experiments
    result = audit(admin_client, "dae-mnist", executions_params(ws, N_EXPERIMENTS))
    assert (result.lost, result.duplicated) == (0, 0), "\n".join(result.problems)
    assert result.runs == sum(map(expected_runs, executions_params(ws, N_EXPERIMENTS).values()))
    assert result.metric_points > 0
    assert server.errors() == []


def test_the_queued_experiments_ran_in_parallel(queued_experiments, admin_client):
    experiment = admin_client.get_experiment_by_name("dae-mnist")
    spans = []
    for i in range(N_EXPERIMENTS):
        runs = admin_client.search_runs([experiment.experiment_id], f"tags.dvc_exp_name = 'load-{i}'")
        spans.append((min(r.info.start_time for r in runs), max(r.info.end_time for r in runs)))
    overlapping = sum(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b)
    assert overlapping > 0, "no two queued experiments ran at the same time"


def test_models_and_registry_versions_are_in_the_server(server, queued_experiments, admin_client, monkeypatch):
    """Each queued experiment registered one version per model through the server; queued runs do
    not move the `current` alias; the model files went through the artifact proxy, and a version
    loads back from the server."""
    import mlflow
    import numpy as np

    for model in ("shallow", "greedy", "random_ft", "greedy_ft"):
        versions = admin_client.search_model_versions(f"name = 'dae-mnist-{model}'")
        assert sorted(v.tags["dvc_exp_name"] for v in versions) == sorted(f"load-{i}" for i in range(N_EXPERIMENTS))
        assert not admin_client.get_registered_model(f"dae-mnist-{model}").aliases
    assert len(list(server.artifacts.rglob("MLmodel"))) == 4 * N_EXPERIMENTS  # one seed each
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    loaded = mlflow.pyfunc.load_model("models:/dae-mnist-greedy_ft/1")
    assert loaded.predict(np.zeros((2, 784), np.float32)).shape == (2, 784)


def test_no_credential_is_in_any_store(server, users, queued_experiments, admin_client, postgres_uri):
    """Neither password appears in a param, tag, artifact, the tracking database, the artifact
    store, the workspace's files or the workers' logs."""
    import psycopg

    ws, _, logs = queued_experiments
    secrets_ = [users["alice"], users["viewer"], server.admin_password]
    experiment = admin_client.get_experiment_by_name("dae-mnist")
    runs = admin_client.search_runs([experiment.experiment_id], max_results=5000)
    assert len(runs) >= sum(map(expected_runs, executions_params(ws, N_EXPERIMENTS).values()))
    logged = json.dumps([[r.data.params, r.data.tags] for r in runs])
    uri = server.backend.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(uri) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        database = "\n".join(str(row) for table in tables for row in conn.execute(f'SELECT * FROM "{table}"'))
    assert len(tables) > 10 and "dae-mnist" in database
    files = [p for folder in (server.artifacts, ws) for p in folder.rglob("*")
             if p.is_file() and ".git" not in p.parts and p.stat().st_size < 50_000_000]
    assert any(p.name == "MLmodel" for p in files) and any(p.name == "dvc.lock" for p in files)
    for secret in secrets_:
        assert secret not in logged
        assert secret not in database
        assert secret not in "\n".join(logs.values())
        encoded = secret.encode()
        assert not [p for p in files if encoded in p.read_bytes()]


def test_experiments_travel_between_clones_with_exp_push_and_pull(queued_experiments, tmp_path_factory):
    """Machine A pushes one experiment (git refs to the git remote, outputs to the DVC remote);
    a fresh clone on machine B pulls it, sees it in `dvc exp show`, applies it and gets its
    outputs, byte for byte."""
    ws, run_a, _ = queued_experiments
    shared = tmp_path_factory.mktemp("shared")
    git_remote, dvc_remote = shared / "repo.git", shared / "dvc-cache"
    run_a("git", "init", "-q", "--bare", str(git_remote))
    run_a("git", "remote", "add", "origin", str(git_remote))
    run_a("git", "push", "-q", "origin", "HEAD")
    run_a(sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "team", str(dvc_remote))
    run_a(sys.executable, "-m", "dvc", "exp", "push", "origin", "load-2")
    assert any(dvc_remote.rglob("*"))

    clone = tmp_path_factory.mktemp("machine-b") / "repo"
    run_a("git", "clone", "-q", str(git_remote), str(clone))
    run_b = runner(clone, run_a.env)
    run_b(sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "team", str(dvc_remote))
    assert "load-2" not in run_b(sys.executable, "-m", "dvc", "exp", "list").stdout
    run_b(sys.executable, "-m", "dvc", "exp", "pull", "origin", "load-2")
    shown = run_b(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout
    assert "load-2" in shown
    run_b(sys.executable, "-m", "dvc", "exp", "apply", "load-2")
    assert "noise.level" in run_b(sys.executable, "-m", "dvc", "params", "diff").stdout  # its 0.20
    run_b(sys.executable, "-m", "dvc", "checkout")
    status = run_b(sys.executable, "-m", "dvc", "status").stdout
    assert "up to date" in status, status
    run_a(sys.executable, "-m", "dvc", "exp", "apply", "load-2")
    run_a(sys.executable, "-m", "dvc", "checkout")
    for output in ("data/models/finetune/greedy_ft.pt", "reports/metrics.json"):
        assert (clone / output).read_bytes() == (ws / output).read_bytes(), output


def test_dvc_push_and_pull_round_trip_through_a_remote(queued_experiments, tmp_path_factory):
    ws, run, _ = queued_experiments
    run(sys.executable, "-m", "dvc", "exp", "apply", "load-4")
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(sys.executable, "-m", "dvc", "remote", "add", "--local", "-f", "-d", "team", str(remote))
    model = ws / "data" / "models" / "finetune" / "greedy_ft.pt"
    run(sys.executable, "-m", "dvc", "checkout")
    kept = model.read_bytes()
    pushed = run(sys.executable, "-m", "dvc", "push")
    assert any(remote.rglob("*")), pushed.stdout
    # A teammate's clone has none of it: drop the outputs and the local cache, then pull.
    shutil.rmtree(ws / "data" / "models")
    shutil.rmtree(ws / "data" / "noisy")
    shutil.rmtree(ws / ".dvc" / "cache")
    run(sys.executable, "-m", "dvc", "pull")
    assert model.read_bytes() == kept
    status = run(sys.executable, "-m", "dvc", "status").stdout
    assert "up to date" in status, status



def test_the_admin_rotates_passwords_with_dae_team(server, users):
    """README: the first admin password is replaced at once; a teammate's can be replaced too."""
    import subprocess

    env = {**os.environ, **server.admin_env()}
    for name in ("viewer", "admin"):
        old = server.admin_password if name == "admin" else users[name]
        out = subprocess.run([sys.executable, "-m", "dae.team", "new-password", name], env=env,
                             capture_output=True, text=True, check=True).stdout
        new = out.rsplit("shown once: ", 1)[1].strip()
        assert len(new) >= 12 and new != old
        search = ("/api/2.0/mlflow/runs/search", {"experiment_ids": ["0"]})
        assert http_status(server, *search, (name, new)) == 200
        # The worker that changed it forgets the old one at once; the other may accept it until
        # its credential cache expires (auth_cache_ttl_seconds, README's team setup).
        deadline = time.monotonic() + server.auth_cache_seconds + 10
        while http_status(server, *search, (name, old)) != 401:
            assert time.monotonic() < deadline, f"{name}'s old password still accepted"
            time.sleep(0.5)
        if name == "admin":
            server.admin_password = new
        else:
            users[name] = new
