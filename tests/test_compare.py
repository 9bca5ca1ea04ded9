import pandas as pd
import pytest

from dae import compare, tracking
from dae.report import LABELS


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """Two pipeline executions (noise level 0.1 and 0.5) logged as the stages log them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DAE_TRACKING", raising=False)
    for name, level in (("sigma-01", 0.1), ("sigma-05", 0.5)):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        (tmp_path / "params.yaml").write_text(f"noise: {{level: {level}}}\n")
        with tracking.stage_run("finetune", {"noise.level": level, "finetune.epochs": 30}) as run, \
                run.member_runs() as runs:
            key = runs.start("finetune greedy_ft seed 0", 0)
            runs.log(key, {"val_loss": level / 10}, step=1)
            runs.finish(key)
        with tracking.stage_run("evaluate", {"classifier.epochs": 30}) as run, run.member_runs() as runs:
            key = runs.start("evaluate greedy_ft seed 0", 0)
            runs.log(key, {"mse": 1.0})  # a per-seed run: must not be taken for the summary
            runs.finish(key)
            run.log_metrics({f"{m}.{k}": level * (i + 1) for i, m in enumerate(LABELS)
                             for k in ("mse", "mse_noisy", "accuracy", "accuracy_noisy")})
    return tmp_path


def test_compare_by_experiment_name(store):
    frame = compare.differing(compare.collect(["sigma-01", "sigma-05"], "dae-mnist"))
    assert list(frame["experiment"]) == ["sigma-01", "sigma-05"]
    assert list(frame["param noise.level"]) == ["0.1", "0.5"]
    assert "param finetune.epochs" not in frame  # the same in both: left out
    assert frame["greedy_ft.mse"].tolist() == pytest.approx([0.4, 2.0])


def test_compare_writes_table_csv_and_plot(store):
    compare.main(["sigma-01", "sigma-05", "--x", "noise.level", "--out", str(store / "out" / "cmp")])
    table = (store / "out" / "cmp.md").read_text()
    assert table.count("\n| sigma-0") == 2
    assert pd.read_csv(store / "out" / "cmp.csv").shape[0] == 2
    assert (store / "out" / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # accuracy in percent, as results.md shows it (level 0.1 × 3rd model = 0.3 -> 30.00 %)
    assert "| 30.00 % |" in table


def test_experiment_comes_from_the_flag_or_the_environment(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "no-such-experiment")
    with pytest.raises(SystemExit, match="no MLflow experiment 'no-such-experiment'"):
        compare.main(["sigma-01", "--out", str(store / "x")])
    compare.main(["sigma-01", "--experiment", "dae-mnist", "--out", str(store / "x")])
    assert "sigma-01" in capsys.readouterr().out


def test_help_names_the_module(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m dae.compare")


def test_unknown_experiment_is_a_clear_error(store):
    with pytest.raises(SystemExit, match="no evaluate run found for 'nope'"):
        compare.collect(["nope"], "dae-mnist")


def test_one_seed_executions_have_no_spread_columns(store):
    frame = compare.collect(["sigma-01", "sigma-05"], "dae-mnist")
    assert not [c for c in frame.columns if c.endswith("_std")]


def _three_seed_frame() -> pd.DataFrame:
    """Two executions as collect() returns them when their evaluate runs logged a spread."""
    rows = []
    for name, kind in (("mask", "masking"), ("sp", "salt_and_pepper")):
        row = {"experiment": name, "pipeline_id": name, "param noise.type": kind}
        for i, model in enumerate(compare.ROW_LABELS):
            for metric in compare.METRICS:
                row[f"{model}.{metric}"] = 0.9 if "accuracy" in metric else 0.01 * (i + 1)
                row[f"{model}.{metric}_std"] = 0.002 if "accuracy" in metric else 0.0003
        rows.append(row)
    return pd.DataFrame(rows)


def test_markdown_shows_mean_and_std_in_one_cell():
    table = compare.to_markdown(_three_seed_frame())
    header = table.splitlines()[0]
    assert "_std" not in header and "greedy_ft.mse" in header
    assert "| 0.0100 ± 0.0003 |" in table and "| 90.00 ± 0.20 % |" in table


def test_bars_plot_writes_a_png(tmp_path):
    compare.plot_bars(_three_seed_frame(), tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_x_and_bars_together_is_refused(store, capsys):
    with pytest.raises(SystemExit):
        compare.main(["sigma-01", "--x", "noise.level", "--bars", "--out", str(store / "x")])
    assert "--x and --bars" in capsys.readouterr().err
