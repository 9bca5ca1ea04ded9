"""dae/serving.py: a trained denoiser as an MLflow model — logged, registered, loaded by name in a
process that cannot import this repository, and refusing bad input with a message."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dae import tracking
from dae.model import TiedAutoencoder
from dae.serving import as_batch


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A model logged and registered as the evaluate stage does it, in a fresh SQLite store."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("data: {dataset: mnist}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DAE_TRACKING", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    torch.manual_seed(0)
    model = TiedAutoencoder([784, 64, 8], linear_code=True)
    model.reset_parameters(4.0, torch.Generator().manual_seed(0))
    images = torch.rand(50, 784)
    with tracking.stage_run("evaluate", {"a": 1}) as run, run.member_runs() as runs:
        key = runs.start("evaluate greedy_ft seed 0", 0, {"model": "greedy_ft"})
        uri = runs.log_model(key, "greedy_ft-seed0", {"arch": model.arch(), "state_dict": model.state_dict()},
                             {"mse": 0.5}, images[:2].numpy(), tags={"model": "greedy_ft", "seed": "0"})
        runs.finish(key)
        version = run.register(uri, "dae-mnist-greedy_ft", seed=0)
    return tmp_path, model, images, uri, version


def test_model_is_registered_with_alias_tags_and_metrics(store):
    import mlflow

    tmp_path, _, _, uri, version = store
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.get_model_version_by_alias("dae-mnist-greedy_ft", tracking.CURRENT_ALIAS)
    assert str(found.version) == version == "1"
    assert {"pipeline_id", "git_commit", "dvc_exp_name", "dataset", "seed"} <= set(found.tags)
    assert found.tags["dataset"] == "mnist" and found.tags["seed"] == "0"
    logged = mlflow.get_logged_model(uri.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics} == {"mse": 0.5}
    assert logged.tags["model"] == "greedy_ft"


def test_loaded_by_name_in_a_process_without_the_repository(store, tmp_path_factory):
    """models:/…@current in a fresh interpreter whose sys.path cannot reach `dae`."""
    tmp_path, model, images, _, _ = store
    outside = tmp_path_factory.mktemp("elsewhere")
    np.save(outside / "images.npy", images.numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, mlflow
        assert "dae" not in sys.modules
        mlflow.set_tracking_uri("sqlite:///{tmp_path}/mlflow.db")
        model = mlflow.pyfunc.load_model("models:/dae-mnist-greedy_ft@current")
        images = np.load("images.npy")
        np.save("recon.npy", model.predict(images))
        np.save("code.npy", model.predict(images, params={{"output": "code"}}))
        try:
            import dae
            print("dae importable:", dae.__file__)
        except ImportError:
            print("dae not importable")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-c", script], cwd=outside, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dae not importable" in result.stdout
    with torch.no_grad():
        assert np.allclose(np.load(outside / "recon.npy"), model(images).numpy(), atol=1e-6)
        assert np.allclose(np.load(outside / "code.npy"), model.encode(images).numpy(), atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 100), np.float32), r"shape \(n, 784\); got shape \(2, 100\)"),
    (np.zeros((0, 784), np.float32), "empty batch"),
    ([], "empty batch"),
    (np.full((1, 784), np.nan, np.float32), "NaN or infinite"),
    ([["a"] * 784], "expected numbers"),
    (np.full((1, 784), 5.0, np.float32), r"image 0 has pixels outside \[-2, 3\]; expected pixels in \[0, 1\]"),
    (np.zeros((10_001, 784), np.float32), "batch of 10001 images is over the limit of 10000"),
])
def test_bad_input_is_refused_with_what_was_expected(bad, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as caught:
        as_batch(bad)
    assert caught.value.get_http_status_code() == 400
    assert len(str(caught.value)) < 200  # says what was wrong, with no echo of the input


def test_a_refusal_keeps_its_message_when_the_scoring_server_rewrites_it():
    """MLflow's scoring server prefixes an MlflowException's message with an echo of the input
    (`e.message = f"Failed to predict data '{data}'..."`); a refusal keeps its reason alone."""
    import mlflow.pyfunc.scoring_server as scoring_server
    from mlflow.exceptions import MlflowException

    from dae.serving import Refusal

    class Model:  # what the server calls: the loaded model's predict
        metadata = None

        def predict(self, data, params=None):
            return as_batch(data)

    with pytest.raises(MlflowException) as caught:
        scoring_server.invocations('{"inputs": [[0.5, 0.5]]}', "application/json", Model(), None)
    assert isinstance(caught.value, Refusal)
    answer = json.loads(caught.value.serialize_as_json())
    assert answer["message"].startswith("expected a batch of flattened 28x28 images, shape (n, 784)")
    assert "0.5" not in answer["message"] and answer["error_code"] == "INVALID_PARAMETER_VALUE"


def test_unknown_output_is_refused(store):
    import mlflow
    from mlflow.exceptions import MlflowException

    tmp_path, _, images, uri, _ = store
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model = mlflow.pyfunc.load_model(uri)
    with pytest.raises(MlflowException, match="params.output must be one of"):
        model.predict(images.numpy(), params={"output": "logits"})


def test_signature_declares_output_and_param_and_leaves_input_checks_to_the_model(store):
    """No input schema: MLflow would enforce it before as_batch, answering with an echo of the input."""
    import mlflow

    tmp_path, _, _, uri, _ = store
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs is None
    spec = json.loads(signature.outputs.to_json())[0]
    assert spec["tensor-spec"]["dtype"] == "float32"
    assert signature.params.to_dict() == [{"name": "output", "type": "string", "default": "reconstruction",
                                           "shape": None}]
