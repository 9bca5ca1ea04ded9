import os

import pytest

from dae import tracking
from dae.tracking import store


def test_default_uri_is_sqlite_at_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db?timeout=60"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_a_store_first_used_by_a_queued_experiment_keeps_artifacts_at_the_root(tmp_path, monkeypatch):
    """DVC deletes a queued experiment's temporary copy afterwards: the runs' artifacts (curves,
    models) must go beside mlflow.db, even when that copy created the store and the experiment."""
    import mlflow

    (tmp_path / ".dvc").mkdir()
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (temp_copy / ".dvc").mkdir(parents=True)
    (temp_copy / "params.yaml").write_text("seeds: [0]\n")
    monkeypatch.chdir(temp_copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.stage_run("stage", {"a": 1}, root=tmp_path, move_alias=False) as run:
        run.log_artifact(temp_copy / "params.yaml")
    artifacts = list((tmp_path / "mlruns").rglob("params.yaml"))
    assert len(artifacts) == 1 and not (temp_copy / "mlruns").exists()
    assert mlflow.get_experiment_by_name("dae-mnist").artifact_location == (tmp_path / "mlruns").as_uri()


def test_retry_settings_while_a_stage_runs_and_the_users_own_win(monkeypatch):
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(store, "USER_RETRY_ENV", frozenset())
    with store.http_policy(store.RETRIES_WHILE_RUNNING, "120", "1"):
        assert [os.environ[n] for n in names] == [store.RETRIES_WHILE_RUNNING, "1", "120"]
        with store.http_policy(store.STARTUP_RETRIES, store.STARTUP_TIMEOUT_S):  # nests
            assert os.environ[names[0]] == "0" and os.environ[names[2]] == "10"
        assert os.environ[names[0]] == store.RETRIES_WHILE_RUNNING
    assert not [n for n in names if n in os.environ]
    monkeypatch.setenv(names[0], "2")  # the user's own, exported before the stage started
    monkeypatch.setattr(store, "USER_RETRY_ENV", frozenset({names[0]}))
    with store.http_policy(store.STARTUP_RETRIES, store.STARTUP_TIMEOUT_S):
        assert os.environ[names[0]] == "2"
    assert os.environ[names[0]] == "2"


def test_a_store_lost_mid_stage_is_one_line(monkeypatch):
    class GoneStore:
        def get_tracking_uri(self):
            return "http://127.0.0.1:5000"

        def log_metrics(self, *args, **kwargs):
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch\n(refused)")

    run = tracking.StageRun(GoneStore(), "1", {}, "dae-mnist")
    with pytest.raises(tracking.TrackingError) as caught:
        run.log_metrics({"x": 1.0}, step=1)
    message = str(caught.value)
    assert message.startswith("lost the MLflow tracking store http://127.0.0.1:5000 while the stage ran")
    assert "ConnectionError: Max retries exceeded" in message and "\n" not in message
    assert "`dvc repro` resumes from the last completed epoch" in message


def test_disabled_tracking_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("seeds: [0]\n")
    monkeypatch.setenv("DAE_TRACKING", "off")
    with tracking.stage_run("stage", {"a": 1}) as run, run.member_runs() as runs:
        run.log_metrics({"x": 1.0})
        key = runs.start("stage seed 0", 0)
        runs.log(key, {"y": 2.0}, step=1)
        runs.finish(key)
    assert not (tmp_path / "mlflow.db").exists()


def test_stage_run_logs_params_metrics_and_shared_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DAE_TRACKING", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("seeds: [0]\n")
    for stage in ("pretrain_layer@1", "evaluate"):
        with tracking.stage_run(stage, {"lr": 0.1}) as run, run.member_runs() as runs:
            key = runs.start(f"{stage} seed 0", 0)
            runs.log(key, {"val_loss": 0.5}, step=1)
            runs.finish(key)
            run.log_metrics({"mse": 0.01})
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    found = mlflow.search_runs(experiment_names=["dae-mnist"])
    parents = found[found["tags.mlflow.parentRunId"].isna()]
    assert sorted(parents["tags.stage"]) == ["evaluate", "pretrain_layer@1"]
    assert parents["tags.pipeline_id"].nunique() == 1
    assert set(parents["tags.dvc_exp_name"]) == {"my-exp"}
    assert set(parents["params.lr"]) == {"0.1"}
    assert set(parents["tags.dataset"]) == {"mnist"}  # no data section: the default dataset
    assert len(found) == 4  # two stage runs, each with one nested seed run
    children = found[found["tags.mlflow.parentRunId"].notna()]
    assert set(children["tags.seed"]) == {"0"} and children["tags.pipeline_id"].nunique() == 1


def test_gpu_metrics_have_their_package():
    """Stage runs log MLflow's system metrics; its GPU monitor needs pynvml (nvidia-ml-py, pinned
    in requirements.txt). Here it must fail only for want of a GPU, never for want of the package."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    try:
        GPUMonitor()
    except ImportError as exc:
        pytest.fail(f"MLflow cannot log GPU metrics: {exc}")
    except RuntimeError as exc:  # a machine without an NVIDIA driver
        assert "NVML" in str(exc)


def test_unreachable_server_fails_fast_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("seeds: [0]\n")
    monkeypatch.delenv("DAE_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(tracking.TrackingError, match="DAE_TRACKING=off"):
        with tracking.stage_run("stage", {}):
            pass


def test_experiment_created_by_another_process_meanwhile_is_used():
    class Raced:  # get -> None, create -> "already exists", get -> the other process's experiment
        def __init__(self):
            self.gets = 0

        def get_experiment_by_name(self, name):
            self.gets += 1
            return None if self.gets == 1 else type("Experiment", (), {"experiment_id": "7"})()

        def create_experiment(self, name, artifact_location=None):
            raise RuntimeError("RESOURCE_ALREADY_EXISTS")

    assert store.experiment_id(Raced(), "dae-mnist", None) == "7"


def _log_one_stage(root: str, stage: str) -> None:
    import os

    os.chdir(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("DAE_TRACKING", None)
    with tracking.stage_run(stage, {"lr": 0.1}) as run:
        for step in range(1, 21):
            run.log_metrics({"val_loss": 1.0 / step}, step=step)
        # ... and each registers a model under the same name, as parallel evaluate stages do
        import numpy as np

        from dae.model import TiedAutoencoder

        model = TiedAutoencoder([784, 4])
        with run.member_runs() as runs:
            key = runs.start(f"{stage} m seed 0", 0)
            uri = runs.log_model(key, "m", {"arch": model.arch(), "state_dict": model.state_dict()}, {"mse": 0.1},
                                 np.zeros((1, 784), np.float32), tags={})
            runs.finish(key)
        run.register(uri, "dae-mnist-greedy_ft", seed=0)


def test_parallel_stages_share_a_new_sqlite_store(tmp_path):
    """What `dvc queue start -j 3` does to a fresh mlflow.db: three processes at once."""
    import multiprocessing

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("seeds: [0]\n")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_log_one_stage, args=(str(tmp_path), f"stage{i}")) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    found = mlflow.search_runs(experiment_names=["dae-mnist"])
    parents = found[found["tags.mlflow.parentRunId"].isna()]
    assert sorted(parents["tags.stage"]) == ["stage0", "stage1", "stage2"] and len(found) == 6  # + one member each
    versions = mlflow.MlflowClient().search_model_versions("name = 'dae-mnist-greedy_ft'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]  # none failed, none duplicated


def test_experiment_follows_the_dataset_unless_named(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking.experiment_name("mnist") == "dae-mnist"
    assert tracking.experiment_name("fashion-mnist") == "dae-fashion-mnist"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-sweep")
    assert tracking.experiment_name("fashion-mnist") == "team-sweep"


@pytest.mark.parametrize("status, message", [
    (401, r"the tracking server refused user 'bob' \(HTTP 401\): check MLFLOW_TRACKING_USERNAME / "
          r"MLFLOW_TRACKING_PASSWORD"),
    (403, r"does not let user 'bob' write to experiment 'dae-mnist' \(HTTP 403\): ask its admin for EDIT"),
])
def test_refused_credentials_stop_the_stage_at_once_with_one_clear_line(tmp_path, monkeypatch, status, message):
    """What an authenticating server answers to a wrong password (401) or a READ-only user (403),
    served on loopback by a stand-in that refuses every request."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = b"You are not authenticated." if status == 401 else b"Permission denied"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("seeds: [0]\n")
    monkeypatch.delenv("DAE_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    try:
        with pytest.raises(tracking.TrackingError, match=message) as caught:
            with tracking.stage_run("finetune@greedy_ft", {}):
                pytest.fail("the stage body must not run")
        assert "not-the-password" not in str(caught.value)
    finally:
        server.shutdown()


def test_dataset_digests_change_with_the_data_and_the_noise_only():
    data = {"dataset": "mnist", "val_size": 5000}
    noise = {"type": "gaussian", "level": 0.3}
    train, val = tracking.dataset_inputs(data, noise, ["train", "val"])
    assert train["name"] == "mnist-train" and train["split"] == "train" and train["digest"] != val["digest"]
    assert tracking.dataset_inputs(data, noise, ["train"])[0] == train
    assert tracking.dataset_inputs(data, noise | {"level": 0.5}, ["train"])[0]["digest"] != train["digest"]
    assert tracking.dataset_inputs(data | {"dataset": "fashion-mnist"}, noise, ["train"])[0]["name"] == "fashion-mnist-train"
