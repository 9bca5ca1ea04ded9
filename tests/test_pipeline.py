"""End to end: `dvc repro` of the whole pipeline on the tiny profile against real MNIST."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.workspace import FASHION_MNIST, ran_stages

STAGES = ["download", "noise", *[f"pretrain_layer@{k}" for k in range(1, 9)], "finetune", "evaluate", "figures"]
# In MLflow every training stage has a run, with a nested run per model and seed.
TRACKED_STAGES = [s for s in STAGES if s not in ("download", "noise")]


@pytest.fixture(scope="module")
def workspace(tiny_pipeline):
    """The session's tiny-profile workspace after its first `dvc repro` (conftest.tiny_pipeline)."""
    return tiny_pipeline


@contextmanager
def params_restored(run):
    """A test that changes the shared workspace's params puts them back, and the outputs with them,
    as README's "Change a knob" does, so that no test depends on another's order. (Not `dvc repro`:
    DVC keeps no run-cache entry for a stage with a `cache: false` out that is neither a metric nor
    a plot, such as the curves, so it would retrain.)"""
    try:
        yield
    finally:
        run("git", "checkout", ".")
        run(sys.executable, "-m", "dvc", "checkout")
        assert "up to date" in run(sys.executable, "-m", "dvc", "status").stdout


def test_every_stage_runs(workspace):
    _, _, first, _ = workspace
    assert sorted(ran_stages(first.stdout)) == sorted(STAGES)


def test_a_second_repro_in_the_same_workspace_gets_the_lock_error(workspace):
    """DVC's locks: the second `dvc repro` stops at once, with the repository lock's error or (as
    DVC releases that lock while a stage's command runs) the lock of the outputs the running stage
    reads; it runs nothing. The first was not disturbed: it ran every stage, and its outputs
    match dvc.lock (the no-op test below)."""
    _, _, _, second = workspace
    output = second.stderr + second.stdout
    assert second.returncode != 0
    assert "Unable to acquire lock" in output or re.search(r"'\S+' is busy, it is being blocked by", output), output
    assert not ran_stages(second.stdout)


def test_metrics_table_and_figure(workspace):
    ws, *_ = workspace
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert list(metrics) == ["shallow", "greedy", "random_ft", "greedy_ft", "pca"]  # the slide's 4, then the baseline
    for row in metrics.values():
        for key in ("mse", "mse_noisy", "accuracy", "accuracy_noisy"):
            assert math.isfinite(row[key]) and math.isfinite(row[f"{key}_std"])
        assert 0 <= row["accuracy"] <= 1 and 0 < row["mse"] < 1
    table = (ws / "reports" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| 1+1", "| 8+8", "| PCA"))]
    assert len(rows) == 5
    png = (ws / "reports" / "figures" / "reconstructions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_mlflow_has_a_run_per_stage(workspace):
    ws, *_ = workspace
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dae-mnist"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert sorted(parents["tags.stage"]) == sorted(TRACKED_STAGES)
    assert parents["tags.pipeline_id"].nunique() == 1  # one `dvc repro`, one tag
    finetune = parents[parents["tags.stage"] == "finetune"].iloc[0]
    assert finetune["params.finetune.epochs"] == "2"
    children = runs[runs["tags.mlflow.parentRunId"] == finetune["run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == sorted(
        f"finetune {m} seed 0" for m in ("shallow", "greedy", "random_ft", "greedy_ft"))
    greedy_ft = children[children["tags.model"] == "greedy_ft"].iloc[0]
    history = mlflow.MlflowClient().get_metric_history(greedy_ft["run_id"], "val_loss")
    assert [m.step for m in history] == [1, 2]


def _registry(ws):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")


def test_models_are_logged_registered_and_linked(workspace):
    """Every model of every seed is an MLflow model with its test metrics, linked to its training
    run; one registry version per model per execution, aliased `current` (a workspace repro)."""
    ws, *_ = workspace
    import mlflow

    client = _registry(ws)
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dae-mnist"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]  # the stage runs, not their per-seed runs
    finetune = parents[parents["tags.stage"] == "finetune"]["run_id"].iloc[0]
    members = runs[runs["tags.mlflow.parentRunId"] == finetune]  # one run per model and seed
    for model in ("shallow", "greedy", "random_ft", "greedy_ft"):
        version = client.get_model_version_by_alias(f"dae-mnist-{model}", "current")
        assert len(client.search_model_versions(f"name = 'dae-mnist-{model}'")) == 1
        assert version.tags["seed"] == "0" and version.tags["dataset"] == "mnist"
        assert version.tags["pipeline_id"] == runs["tags.pipeline_id"].iloc[0]
        logged = mlflow.get_logged_model(version.source.removeprefix("models:/"))  # the logged model
        assert {m.key: m.value for m in logged.metrics}["mse_noisy"] == pytest.approx(metrics[model]["mse_noisy"])
        trained_by = members[(members["tags.model"] == model) & (members["tags.seed"] == "0")]["run_id"].iloc[0]
        assert logged.tags["training_run_id"] == trained_by
        latest = mlflow.pyfunc.load_model(f"models:/dae-mnist-{model}/latest")  # the README's name for it
        assert latest.metadata.model_id == logged.model_id
    evaluate = parents[parents["tags.stage"] == "evaluate"].iloc[0]
    inputs = client.get_run(evaluate["run_id"]).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["mnist-test", "mnist-train", "mnist-val"]
    assert len({i.dataset.digest for i in inputs}) == 3


def _post(url: str, body: str) -> tuple[int, str]:
    """POST a JSON body; the status and the answer, also for an HTTP error."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _served_model_answers(url: str, ws: Path) -> None:
    """The served greedy_ft model over real HTTP: the noisy test digits give the pipeline's MSE,
    codes on request, and each bad request a 400 whose message is the reason alone."""
    import numpy as np
    import torch

    test = torch.load(ws / "data" / "noisy" / "test.pt", weights_only=True)
    clean = test["clean"].float().numpy() / 255.0
    status, body = _post(url, json.dumps({"inputs": test["noisy"].numpy().tolist()}))
    assert status == 200, body[:300]
    recon = np.asarray(json.loads(body)["predictions"], dtype=np.float32)
    expected = json.loads((ws / "reports" / "metrics.json").read_text())["greedy_ft"]["mse_noisy"]
    assert float(np.mean((recon - clean) ** 2)) == pytest.approx(expected, abs=1e-6)
    status, body = _post(url, json.dumps({"inputs": test["noisy"][:3].numpy().tolist(), "params": {"output": "code"}}))
    assert status == 200 and np.asarray(json.loads(body)["predictions"]).shape == (3, 8)
    bad = {  # request -> how the answer's message starts: what was wrong, what is expected
        json.dumps({"inputs": [[0.5] * 100]}): "expected a batch of flattened 28x28 images, shape (n, 784); "
                                               "got shape (1, 100)",
        json.dumps({"inputs": [["white"] * 784]}): "expected numbers (float32 pixels in [0, 1])",
        json.dumps({"inputs": [[float("nan")] * 784]}): "image 0 holds NaN or infinite values; expected finite",
        json.dumps({"inputs": []}): "empty batch: send at least one image of 784 values",
        json.dumps({"inputs": [[5.0] * 784]}): "image 0 has pixels outside [-2, 3]; expected pixels in [0, 1]",
        json.dumps({"inputs": [[0.5] * 784] * 10_001}): "batch of 10001 images is over the limit of 10000",
    }
    for body, reason in bad.items():
        status, answer = _post(url, body)
        assert status == 400, (body[:40], status, answer[:300])
        assert json.loads(answer)["message"].startswith(reason), (body[:40], answer[:300])
        assert len(answer) < 300, (body[:40], answer[:300])  # the reason alone: no echo, no traceback


def _readme_block(section: str, language: str) -> str:
    """The first ```language block of the README section headed `## section`."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_model_section_runs_as_written(workspace):
    """"Use a trained model": its Python snippet, then its `mlflow models serve` + `curl` lines,
    exactly as the README has them, in the workspace after a `dvc repro`; then the server they
    started answers real requests, good and bad (_served_model_answers)."""
    ws, *_ = workspace
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTHONPATH", None)  # the served model needs nothing of this repository
    snippet = _readme_block("Use a trained model", "python") + "print(denoised.shape, codes.shape)\n"
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ws, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2].startswith("(5, 784) (5, "), result.stdout

    lines = _readme_block("Use a trained model", "bash")
    port = re.search(r" -p (\d+)", lines).group(1)
    shell = subprocess.Popen(["bash", "-c", lines], cwd=ws, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        shell.wait(timeout=240)  # bash ends after the curl; the server it started runs on
        _served_model_answers(f"http://127.0.0.1:{port}/invocations", ws)
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
    out = shell.stdout.read()  # complete once the server, which shares the pipe, has ended
    # The curl's answer, which has no newline of its own: the server's access log may follow it.
    answer = out[out.index('{"predictions"'):]
    predictions = json.JSONDecoder().raw_decode(answer)[0]["predictions"]
    assert len(predictions) == 1 and len(predictions[0]) == 784


def test_the_readme_mlflow_ui_tour_works_in_a_browser(workspace, tmp_path):
    """`mlflow ui` on the workspace's store, driven in headless Chromium through the README's
    steps: the evaluate run with its metrics and per-seed runs, the loss curves of a seed run,
    and the registered models."""
    from tests.browser import chromium_or_skip, mlflow_ui, readme_tour

    chromium = chromium_or_skip()
    ws, *_ = workspace
    with mlflow_ui(ws / "mlflow.db", tmp_path / "ui.log") as url:
        readme_tour(url, chromium, ["shallow", "greedy", "random_ft", "greedy_ft"], tmp_path)


def test_second_repro_is_a_no_op(workspace):
    ws, run, *_ = workspace
    second = run(sys.executable, "-m", "dvc", "repro")
    assert ran_stages(second.stdout) == []
    assert "up to date" in second.stdout
    assert len(_registry(ws).search_model_versions("name = 'dae-mnist-greedy_ft'")) == 1  # no new version


def test_models_are_dvc_artifacts(workspace, tmp_path):
    """dvc.yaml declares the four models as `artifacts:`; once a version is tagged (GTO's git tag
    format, <name>@v<semver>), `dvc artifacts get` fetches it from the repository's DVC remote."""
    ws, run, *_ = workspace
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "-f", "team", str(tmp_path / "remote"))
    run(sys.executable, "-m", "dvc", "push", "data/models/finetune/greedy_ft.pt")
    run("git", "commit", "-q", "-m", "DVC remote", ".dvc/config")
    run("git", "tag", "-a", "dae-mnist-greedy_ft@v1.0.0", "-m", "greedy_ft v1.0.0")  # annotated, as GTO reads it
    out = tmp_path / "greedy_ft.pt"
    run(sys.executable, "-m", "dvc", "artifacts", "get", str(ws), "dae-mnist-greedy_ft", "-o", str(out))
    assert out.read_bytes() == (ws / "data" / "models" / "finetune" / "greedy_ft.pt").read_bytes()


def test_finetune_change_reruns_only_what_depends_on_it(workspace):
    """A finetune knob changes finetune's params and nothing upstream: `dvc repro --dry` would
    run finetune alone (evaluate and figures follow once its models change, as the Fashion-MNIST
    experiment below shows for the whole chain)."""
    ws, run, *_ = workspace
    with params_restored(run):
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["finetune"]["epochs"] = 3
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        diff = run(sys.executable, "-m", "dvc", "params", "diff")
        assert "finetune.epochs" in diff.stdout
        assert ran_stages(run(sys.executable, "-m", "dvc", "repro", "--dry").stdout) == ["finetune"]


@pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_an_experiment_on_fashion_mnist_with_a_2d_code_is_logged_with_its_name(fashion_experiment):
    """`dvc exp run -n fashion-two-d -S data.dataset=fashion-mnist -S arch.bottleneck=2` (one
    experiment for two knobs, as each reruns the whole pipeline): Fashion-MNIST's own checksums
    (the MNIST files in DAE_DATA_MIRROR, tried first, fail them; Debian's folder passes), a report
    that names the dataset and the 2-d code and has no slide numbers, and MLflow runs in the
    dataset's experiment that know the DVC experiment's name. (Its own workspace, trained beside
    the session's tiny pipeline: conftest.fashion_experiment.)"""
    ws, run, wait = fashion_experiment
    result = wait()
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "verified (from /usr/share/datasets/fashion-mnist/" in log, log
    assert ran_stages(result.stdout) == STAGES
    table = (ws / "reports" / "results.md").read_text()
    assert "Fashion-MNIST" in table and "slide" not in table.splitlines()[0].lower()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "slide" not in header.lower()
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"shallow", "greedy", "random_ft", "greedy_ft", "pca"}
    assert all(math.isfinite(row["mse"]) for row in metrics.values())
    assert (ws / "reports" / "figures" / "latent_space.png").stat().st_size > 10_000
    page = (ws / "reports" / "index.md").read_text()
    assert page.startswith("# Deep denoising autoencoders on Fashion-MNIST") and "digit" not in page
    assert "2-d" in page
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dae-fashion-mnist"],
                              filter_string="tags.dvc_exp_name = 'fashion-two-d'")
    assert {"evaluate", "figures", "finetune"} <= set(runs["tags.stage"])
    assert set(runs["tags.dataset"]) == {"fashion-mnist"}
    shown = run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout
    assert "fashion-two-d" in shown
