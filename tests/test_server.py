"""Integration: a team's setup — an `mlflow server` on PostgreSQL with a shared artifact store,
two queued experiments run in parallel (`dvc queue start -j 2`), and a DVC remote.

Needs a PostgreSQL database: `DAE_TEST_POSTGRES_URI` (postgresql+psycopg://user:password@127.0.0.1/db).
`.ci/run` installs PostgreSQL from Debian's packages, starts it on loopback and sets the variable
(with DAE_REQUIRE_SERVER_TEST=1, so CI fails rather than skips); elsewhere the test is skipped.
Everything talks to 127.0.0.1 only, and the MLflow server is stopped at the end.
"""
import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.workspace import make_workspace

POSTGRES_ENV = "DAE_TEST_POSTGRES_URI"
EXPERIMENTS = {"sigma-low": "0.2", "sigma-high": "0.4"}
TRACKED_STAGES = {*(f"pretrain_layer@{k}" for k in range(1, 9)),
                  *(f"finetune@{m}" for m in ("shallow", "greedy", "random_ft", "greedy_ft")), "evaluate", "figures"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_uri() -> str:
    uri = os.environ.get(POSTGRES_ENV)
    if not uri:
        if os.environ.get("DAE_REQUIRE_SERVER_TEST"):
            pytest.fail(f"{POSTGRES_ENV} is not set but DAE_REQUIRE_SERVER_TEST is: PostgreSQL did not start")
        pytest.skip(f"{POSTGRES_ENV} is not set (see .ci/run for how CI starts PostgreSQL)")
    assert "@127.0.0.1" in uri or "@localhost" in uri, "the test only talks to loopback"
    return uri


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, tmp_path_factory):
    """`mlflow server` on loopback: runs in PostgreSQL, artifacts proxied into a shared folder."""
    artifacts = tmp_path_factory.mktemp("artifact-store")
    port = _free_port()
    log = (tmp_path_factory.mktemp("server-log") / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_uri,
         "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not come up:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(1)
        yield url, artifacts
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def queued_experiments(mlflow_server, mnist_mirror, tmp_path_factory):
    """Two `dvc exp run --queue` experiments on the tiny profile, run with `dvc queue start -j 2`."""
    url, _ = mlflow_server
    ws = tmp_path_factory.mktemp("team-repo")
    run = make_workspace(ws, mnist_mirror, {"MLFLOW_TRACKING_URI": url})
    for name, level in EXPERIMENTS.items():
        run(sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, "-S", f"noise.level={level}")
    run(sys.executable, "-m", "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 1200
    while True:
        status = run(sys.executable, "-m", "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        if time.monotonic() > deadline:
            run(sys.executable, "-m", "dvc", "queue", "stop", "--kill", check=False)
            pytest.fail(f"queued experiments did not finish in 20 min:\n{status}")
        time.sleep(5)
    logs = {name: run(sys.executable, "-m", "dvc", "queue", "logs", name, check=False).stdout
            for name in EXPERIMENTS}
    assert status.count("Success") == len(EXPERIMENTS), f"{status}\n" + "\n".join(logs.values())
    return ws, run


def test_parallel_queued_experiments_are_in_the_server(mlflow_server, queued_experiments):
    url, artifact_store = mlflow_server
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("dae-mnist")
    spans = {}
    for name, level in EXPERIMENTS.items():
        runs = client.search_runs([experiment.experiment_id], f"tags.dvc_exp_name = '{name}'")
        for r in runs:
            assert r.info.status == "FINISHED"
        stage_runs = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
        assert set(stage_runs) == TRACKED_STAGES, name
        evaluate, finetune = stage_runs["evaluate"], stage_runs["finetune@greedy_ft"]
        assert finetune.data.params["noise.level"] == level
        for model in ("shallow", "greedy", "random_ft", "greedy_ft"):
            assert 0 < evaluate.data.metrics[f"{model}.mse"] < 1
            assert 0 <= evaluate.data.metrics[f"{model}.accuracy"] <= 1
        # The results table went through the server's artifact proxy into the shared store.
        assert "results.md" in {a.path for a in client.list_artifacts(evaluate.info.run_id)}
        spans[name] = (min(r.info.start_time for r in runs), max(r.info.end_time for r in runs))
    assert list(artifact_store.rglob("results.md"))
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, "the two queued experiments did not run in parallel"


def test_models_and_registry_versions_are_in_the_server(mlflow_server, queued_experiments, monkeypatch):
    """Each queued experiment registered one version per model through the server, with its
    experiment's name; queued runs do not move the `current` alias; the model files went through
    the artifact proxy, and a version loads back from the server."""
    url, artifact_store = mlflow_server
    import mlflow
    import numpy as np

    client = mlflow.MlflowClient(url)
    for model in ("shallow", "greedy", "random_ft", "greedy_ft"):
        versions = client.search_model_versions(f"name = 'dae-mnist-{model}'")
        assert sorted(v.tags["dvc_exp_name"] for v in versions) == sorted(EXPERIMENTS)
        assert not client.get_registered_model(f"dae-mnist-{model}").aliases
    assert len(list(artifact_store.rglob("MLmodel"))) == 4 * len(EXPERIMENTS)  # one seed each
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    loaded = mlflow.pyfunc.load_model("models:/dae-mnist-greedy_ft/1")
    assert loaded.predict(np.zeros((2, 784), np.float32)).shape == (2, 784)


def test_dvc_push_and_pull_round_trip_through_a_remote(queued_experiments, tmp_path_factory):
    ws, run = queued_experiments
    run(sys.executable, "-m", "dvc", "exp", "apply", "sigma-high")  # (restores .dvc/config too)
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(remote))
    model = ws / "data" / "models" / "finetune" / "greedy_ft.pt"
    kept = tmp_path_factory.mktemp("kept") / "greedy_ft.pt"
    shutil.copy2(model, kept)
    pushed = run(sys.executable, "-m", "dvc", "push")
    assert any(remote.rglob("*")), pushed.stdout
    # A teammate's clone has none of it: drop the outputs and the local cache, then pull.
    shutil.rmtree(ws / "data" / "models")
    shutil.rmtree(ws / "data" / "noisy")
    shutil.rmtree(ws / ".dvc" / "cache")
    run(sys.executable, "-m", "dvc", "pull")
    assert filecmp.cmp(model, kept, shallow=False)
    status = run(sys.executable, "-m", "dvc", "status").stdout
    assert "up to date" in status, status
