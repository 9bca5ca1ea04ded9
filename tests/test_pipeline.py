"""End to end: `dvc repro` of the whole pipeline on the tiny profile against real MNIST."""
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tests.workspace import make_workspace, ran_stages

STAGES = ["download", "noise", *[f"pretrain_layer@{k}" for k in range(1, 9)],
          *[f"finetune@{m}" for m in ("shallow", "greedy", "random_ft", "greedy_ft")], "evaluate", "figures"]
TRACKED_STAGES = [s for s in STAGES if s not in ("download", "noise")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mnist_mirror):
    """A copy of the repository (what git would clone) with the tiny profile applied."""
    ws = tmp_path_factory.mktemp("repo")
    run = make_workspace(ws, mnist_mirror)
    first = run(sys.executable, "-m", "dvc", "repro")
    return ws, run, first


def test_every_stage_runs(workspace):
    _, _, first = workspace
    assert sorted(ran_stages(first.stdout)) == sorted(STAGES)


def test_metrics_table_and_figure(workspace):
    ws, _, _ = workspace
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert list(metrics) == ["shallow", "greedy", "random_ft", "greedy_ft"]
    for row in metrics.values():
        for key in ("mse", "mse_noisy", "accuracy", "accuracy_noisy"):
            assert math.isfinite(row[key]) and math.isfinite(row[f"{key}_std"])
        assert 0 <= row["accuracy"] <= 1 and 0 < row["mse"] < 1
    table = (ws / "reports" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| 1+1", "| 8+8"))]
    assert len(rows) == 4
    png = (ws / "reports" / "figures" / "reconstructions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_mlflow_has_a_run_per_stage(workspace):
    ws, _, _ = workspace
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dae-mnist"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert sorted(parents["tags.stage"]) == sorted(TRACKED_STAGES)
    assert parents["tags.pipeline_id"].nunique() == 1  # one `dvc repro`, one tag
    finetune = parents[parents["tags.stage"] == "finetune@greedy_ft"].iloc[0]
    assert finetune["params.finetune.epochs"] == "2"
    children = runs[runs["tags.mlflow.parentRunId"] == finetune["run_id"]]
    history = mlflow.MlflowClient().get_metric_history(children.iloc[0]["run_id"], "val_loss")
    assert [m.step for m in history] == [1, 2]


def test_second_repro_is_a_no_op(workspace):
    _, run, _ = workspace
    second = run(sys.executable, "-m", "dvc", "repro")
    assert ran_stages(second.stdout) == []
    assert "up to date" in second.stdout


def test_finetune_change_reruns_only_what_depends_on_it(workspace):
    ws, run, _ = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["finetune"]["epochs"] = 3
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    diff = run(sys.executable, "-m", "dvc", "params", "diff")
    assert "finetune.epochs" in diff.stdout
    ran = ran_stages(run(sys.executable, "-m", "dvc", "repro").stdout)
    assert {"finetune@shallow", "finetune@random_ft", "finetune@greedy_ft", "evaluate", "figures"} <= set(ran)
    assert not [s for s in ran if s.startswith("pretrain_layer") or s in ("download", "noise")]


def test_two_d_bottleneck_experiment_is_logged_with_its_name(workspace):
    """`dvc exp run -S arch.bottleneck=2`: the 2-D variant runs, and MLflow knows the experiment."""
    ws, run, _ = workspace
    result = run(sys.executable, "-m", "dvc", "exp", "run", "-n", "two-d", "-S", "arch.bottleneck=2")
    assert "figures" in ran_stages(result.stdout)
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"shallow", "greedy", "random_ft", "greedy_ft"}
    assert (ws / "reports" / "figures" / "latent_space.png").stat().st_size > 10_000
    assert "2-d" in (ws / "reports" / "index.md").read_text()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dae-mnist"], filter_string="tags.dvc_exp_name = 'two-d'")
    assert {"evaluate", "figures", "finetune@greedy_ft"} <= set(runs["tags.stage"])
    shown = run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout
    assert "two-d" in shown


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_runs_the_same_pipeline(workspace):
    """`-S data.dataset=fashion-mnist`: its own checksums (the MNIST files in DAE_DATA_MIRROR,
    tried first, fail them; Debian's folder passes), and a report that names the dataset and has
    no slide numbers."""
    ws, run, _ = workspace
    result = run(sys.executable, "-m", "dvc", "exp", "run", "-n", "fashion", "-S", "data.dataset=fashion-mnist")
    log = result.stdout + result.stderr
    assert "verified (from /usr/share/datasets/fashion-mnist/" in log, log
    table = (ws / "reports" / "results.md").read_text()
    assert "FASHION-MNIST" in table and "slide" not in table.splitlines()[0].lower()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "slide" not in header.lower()
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert all(math.isfinite(row["mse"]) for row in metrics.values())
