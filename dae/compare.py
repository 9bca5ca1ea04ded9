"""Compare pipeline executions logged to MLflow: the params that differ and every model's metrics.

    python -m dae.compare EXP [EXP ...] [--x noise.level | --bars] [--out reports/compare] [--experiment dae-mnist]

Each EXP is a DVC experiment name (the `dvc_exp_name` tag), a `pipeline_id` tag, or an MLflow
run id of an `evaluate` run, looked up in the MLflow experiment --experiment (default:
$MLFLOW_EXPERIMENT_NAME, else dae-mnist; Fashion-MNIST runs are in dae-fashion-mnist). The params
of an execution are the union of what its stages logged; the metrics are its evaluate run's (mean
± std where it has several seeds). Writes <out>.md, <out>.csv and, with --x, <out>.png (each
metric against that param, one line per model) or, with --bars, <out>.png as bars (one group per
execution, the std as error bars). Reads MLflow's API only. Accuracy is in percent in the markdown
table and the plot, a fraction in the CSV (as in reports/results.*).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from dae.report import METRICS, ROW_LABELS


def _evaluate_run(client, experiment_ids: list[str], key: str):
    """The newest evaluate run whose dvc_exp_name, pipeline_id or run id is `key`."""
    for clause in (f"tags.dvc_exp_name = '{key}'", f"tags.pipeline_id = '{key}'"):
        runs = client.search_runs(experiment_ids, f"tags.stage = 'evaluate' and {clause}",
                                  order_by=["attributes.start_time DESC"], max_results=200)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # not the per-seed runs
        if parents:
            return parents[0]
    try:
        run = client.get_run(key)
    except Exception:  # noqa: BLE001 - not a run id either
        return None
    return run if run.data.tags.get("stage") == "evaluate" else None


def collect(keys: list[str], experiment: str) -> pd.DataFrame:
    """One row per execution: its params (union over its stages) and the evaluate metrics."""
    from mlflow.tracking import MlflowClient

    from dae.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} at {tracking_uri()}")
    rows = []
    for key in keys:
        run = _evaluate_run(client, [found.experiment_id], key)
        if run is None:
            raise SystemExit(f"no evaluate run found for {key!r} (a DVC experiment name, pipeline_id or run id)")
        pipeline_id = run.data.tags.get("pipeline_id", "")
        params: dict[str, str] = {}
        stage_runs = client.search_runs([found.experiment_id], f"tags.pipeline_id = '{pipeline_id}'",
                                        max_results=1000)
        for stage_run in stage_runs + [run]:
            if "mlflow.parentRunId" not in stage_run.data.tags:
                params.update(stage_run.data.params)
        row = {"experiment": key, "pipeline_id": pipeline_id}
        row |= {f"param {k}": v for k, v in sorted(params.items())}
        for m in ROW_LABELS:
            for metric in METRICS:
                row[f"{m}.{metric}"] = run.data.metrics.get(f"{m}.{metric}")
                row[f"{m}.{metric}_std"] = run.data.metrics.get(f"{m}.{metric}_std")
        rows.append(row)
    frame = pd.DataFrame(rows)
    # A spread over seeds is kept where there is one: one-seed executions log none (or 0).
    spread = [c for c in frame.columns if c.endswith("_std")]
    return frame.drop(columns=[c for c in spread if not (pd.to_numeric(frame[c]).fillna(0) > 0).any()])


def differing(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep the params that differ between executions, and every metric."""
    keep = [c for c in frame.columns
            if not c.startswith("param ") or frame[c].astype(str).nunique(dropna=False) > 1]
    return frame[keep]


def to_markdown(frame: pd.DataFrame) -> str:
    """The table with MSEs to 4 decimals and accuracies in percent (2 decimals), as results.md."""
    def fmt(column: str, value) -> str:
        if not isinstance(value, float):
            return str(value)
        return f"{100 * value:.2f} %" if ".accuracy" in column else f"{value:.4f}"

    def cell(column: str, row: pd.Series) -> str:
        text = fmt(column, row[column])
        if f"{column}_std" in row and isinstance(row[f"{column}_std"], float):  # mean ± std over seeds
            text = text.replace(" %", "") + " ± " + fmt(column, row[f"{column}_std"])
        return text

    columns = [c for c in frame.columns if not c.endswith("_std")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row) for c in columns) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame, x: str, path: Path) -> None:
    from dae.figures import plt, save

    column = f"param {x}"
    if column not in frame:
        raise SystemExit(f"--x {x}: no such param in these runs")
    data = frame.assign(_x=pd.to_numeric(frame[column], errors="coerce")).sort_values("_x")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("mse", "mse_noisy", "accuracy")):
        scale = 100 if metric == "accuracy" else 1
        for model, label in ROW_LABELS.items():
            values = pd.to_numeric(data[f"{model}.{metric}"])  # None (NaN): a run from before that row existed
            ax.plot(data["_x"], scale * values, marker="o", label=label)
        ax.set_xlabel(x)
        ax.set_ylabel("accuracy (%)" if metric == "accuracy" else metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Test metrics against {x}")
    fig.tight_layout()
    save(fig, path)


def plot_bars(frame: pd.DataFrame, path: Path) -> None:
    """One group of bars per execution (named by the params that differ, else its name), one bar
    per model, with the spread over seeds as error bars where there is one."""
    from dae.figures import plt, save

    # named by the values of the params that differ, words before numbers: "masking 0.7"
    params = sorted((c for c in frame.columns if c.startswith("param ")),
                    key=lambda c: pd.to_numeric(frame[c], errors="coerce").notna().all())
    names = [" ".join(str(row[c]) for c in params) or row["experiment"] for _, row in frame.iterrows()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(ROW_LABELS)
    for ax, metric in zip(axes, ("mse", "mse_noisy", "accuracy")):
        scale = 100 if metric == "accuracy" else 1
        for i, (model, label) in enumerate(ROW_LABELS.items()):
            values = scale * pd.to_numeric(frame[f"{model}.{metric}"])
            spread = frame.get(f"{model}.{metric}_std")
            ax.bar([g + (i - (len(ROW_LABELS) - 1) / 2) * width for g in range(len(frame))], values, width,
                   yerr=None if spread is None else scale * pd.to_numeric(spread), capsize=2, label=label)
        ax.set_xticks(range(len(frame)), names, rotation=15, ha="right", fontsize=9)
        ax.set_ylabel("accuracy (%)" if metric == "accuracy" else metric)
        if metric == "accuracy":
            accuracies = pd.concat([scale * pd.to_numeric(frame[f"{m}.accuracy"]) for m in ROW_LABELS])
            ax.set_ylim(max(0.0, accuracies.min() - 2), min(100.0, accuracies.max() + 1))
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("Test metrics" + (" (mean ± std over seeds)" if any(c.endswith("_std") for c in frame) else ""))
    fig.tight_layout()
    save(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dae.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dae-mnist",
                        help="the MLflow experiment to search (default: $MLFLOW_EXPERIMENT_NAME, else dae-mnist)")
    parser.add_argument("--x", help="a param to plot the metrics against, e.g. noise.level")
    parser.add_argument("--bars", action="store_true",
                        help="plot each execution's metrics as bars (for params that are not numbers, e.g. noise.type)")
    parser.add_argument("--out", default="reports/compare", help="output path without extension")
    args = parser.parse_args(argv)
    if args.x and args.bars:
        parser.error("--x and --bars both write <out>.png: give one")

    from dae.io import write_text, write_with

    frame = differing(collect(args.experiments, args.experiment))
    out = Path(args.out)
    write_with(out.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))
    write_text(out.with_suffix(".md"), to_markdown(frame))
    if args.x:
        plot(frame, args.x, out.with_suffix(".png"))
    elif args.bars:
        plot_bars(frame, out.with_suffix(".png"))
    sys.stdout.write(to_markdown(frame))


if __name__ == "__main__":
    main()
