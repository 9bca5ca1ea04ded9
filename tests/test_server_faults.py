"""Faults of a team setup while a stage trains: the tracking server stopped (and back, or not),
and PostgreSQL stopped under the running server.

What a stage does (dae/tracking/): a server or database that goes away mid-stage is waited for,
MLflow's client retrying each request with backoff for about two minutes; if it comes back, the
stage completes with every metric point logged exactly once; if not, the stage stops with one
line, writes no outputs, and the rerun resumes from the last completed epoch.

Needs PostgreSQL as tests/test_server.py does; the PostgreSQL fault also needs
DAE_TEST_POSTGRES_CTL, the command that stops and starts that cluster (`.ci/run` sets it to
`pg_ctlcluster <version> main`), and is skipped without it.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.team_server import TrackingServer, team_user
from tests.workspace import prepare_workspace

EPOCHS = 12  # enough after KILL_AT to log into the outage: the stage is paused while it begins
KILL_AT = 5


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    srv = TrackingServer.authenticated(postgres_uri, tmp_path_factory.mktemp("faults-server"), "dae_faults")
    srv.start()
    srv.password = team_user(srv, "alice", edit=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist_mirror):
    ws = prepare_workspace(tmp_path_factory.mktemp("faults-ws"), mnist_mirror)
    ws.run_all([f"pretrain_layer@{k}" for k in range(2, 9)])  # finetune reads layer 8
    # shallow trains first; the fault comes in its epochs.
    ws.set_param("finetune.epochs", {"shallow": EPOCHS, "random_ft": 1, "greedy_ft": 1})
    return ws


@pytest.fixture()
def ws(prepared, server, tmp_path):
    ws = prepared.copy(tmp_path / "ws")
    ws.env |= {"DAE_TRACKING": "on", "MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "alice",
               "MLFLOW_TRACKING_PASSWORD": server.password, "OMP_NUM_THREADS": "1"}
    return ws


def train_and(ws, down, up=None, outage: float = 3, env: dict | None = None) -> tuple[int, str]:
    """Run finetune; after shallow's epoch KILL_AT take the store down with `down()` while the stage
    is paused (SIGSTOP), so that the epochs after it meet the outage whatever the machine's speed;
    let the stage run into it for `outage` seconds, then `up()`. Its exit status and output."""
    proc = subprocess.Popen(ws.command("finetune"), cwd=ws.path,
                            env={**ws.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"epoch {KILL_AT}/{EPOCHS}" in line:
            proc.send_signal(signal.SIGSTOP)
            try:
                down()
            finally:
                proc.send_signal(signal.SIGCONT)
            if up is not None:
                time.sleep(outage)
                up()
            break
    rest = proc.communicate(timeout=600)[0]
    return proc.returncode, "".join(lines) + rest


def seed_run_history(server, key: str = "train_loss") -> tuple[str, list[int]]:
    """The newest run of shallow seed 0 in finetune: its status and the steps of `key`."""
    from mlflow import MlflowClient

    os.environ.update({k: v for k, v in server.admin_env().items() if k != "MLFLOW_TRACKING_URI"})
    try:
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("dae-mnist")
        run = client.search_runs([experiment.experiment_id],
                                 "tags.stage = 'finetune' and tags.model = 'shallow' and tags.seed = '0'",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    return run.info.status, sorted(steps)


def test_server_stopped_and_back_within_the_retries_the_stage_completes(ws, server):
    code, output = train_and(ws, server.stop, server.start)
    assert code == 0, output
    assert (ws.path / "data/models/finetune/shallow.pt").exists()
    # Not one epoch's metrics lost or logged twice across the outage.
    assert seed_run_history(server) == ("FINISHED", list(range(1, EPOCHS + 1)))


def test_server_gone_for_good_the_stage_stops_with_one_line_and_no_outputs(ws, server):
    # A short retry budget (MLflow's own setting; the user's value wins over the stage's two minutes).
    code, output = train_and(ws, server.stop, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})
    try:
        assert code == 1, output
        assert re.search(r"ERROR in stage finetune: lost the MLflow tracking store "
                         r"http://127\.0\.0\.1:\d+ while the stage ran", output), output
        assert "`dvc repro` resumes from the last completed epoch" in output
        assert "Traceback" not in output
        assert not (ws.path / "data/models/finetune/shallow.pt").exists()
        assert not (ws.path / "reports/curves/finetune_shallow.csv").exists()
        assert (ws.path / "data/checkpoints/finetune/shallow-seed0.pt").exists()
    finally:
        server.start()
    resumed = ws.stage("finetune")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming after epoch ([4-9]|\d\d+)\b", resumed.stderr), resumed.stderr
    assert (ws.path / "data/models/finetune/shallow.pt").exists()


def test_postgresql_stopped_under_the_server_the_stage_waits_and_completes(ws, server):
    control = os.environ.get("DAE_TEST_POSTGRES_CTL")
    if not control:
        if os.environ.get("DAE_REQUIRE_SERVER_TEST"):
            pytest.fail("DAE_TEST_POSTGRES_CTL is not set but DAE_REQUIRE_SERVER_TEST is")
        pytest.skip("DAE_TEST_POSTGRES_CTL (how to stop and start PostgreSQL) is not set")

    code, output = train_and(ws, lambda: subprocess.run([*control.split(), "stop", "-m", "fast"], check=True),
                             lambda: subprocess.run([*control.split(), "start"], check=True), outage=5)
    assert code == 0, output
    assert seed_run_history(server) == ("FINISHED", list(range(1, EPOCHS + 1)))
