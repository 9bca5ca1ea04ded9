"""evaluate: the slide's table on the 10k test set, for every model and seed.

Writes reports/metrics.json (DVC metrics; the mean over seeds plus *_std keys),
reports/results.csv and reports/results.md (the slide's table with ours beside it).
With tracking on, it also logs every model of every seed as an MLflow model (dae/serving.py)
carrying its test metrics and linked to the run that trained it, and registers the first
seed's model of each kind as a new version of `dae-<dataset>-<model>` (alias `current` when
run in the workspace).
"""
from pathlib import Path

from stages.common import (FINETUNE_DIR, data_inputs, fit_config, load_checkpoint, load_params, log, make_deterministic,
                           run_stage, select_device)

SECTIONS = ["arch", "classifier", "seeds", "device", "data"]
REPORTS = Path("reports")


def main() -> None:
    import pandas as pd

    from dae import report
    from dae.evaluate import accuracy, batched, reconstruction_mse, train_classifier
    from dae.io import write_json, write_text, write_with
    from dae.model import TiedAutoencoder
    from dae.params import MODELS, model_arch, section_flat
    from dae.tracking import registered_model_name, stage_run
    from stages.common import load_split

    params = load_params(SECTIONS)
    device = select_device(params["device"])
    make_deterministic(device)
    cfg = params["classifier"]
    config = fit_config(params, "classifier")
    train, val, test = (load_split(s, device) for s in ("train", "val", "test"))

    dataset = params["data"]["dataset"]
    example = test["noisy"][:2].cpu().numpy()  # the input example every logged model carries
    per_seed: dict[str, list[dict]] = {}
    inputs = data_inputs(["train", "val", "test"])
    with stage_run("evaluate", section_flat(params, SECTIONS), inputs=inputs) as run:
        for name in MODELS:
            arch = model_arch(params, name)
            ckpt = load_checkpoint(FINETUNE_DIR / f"{name}.pt", arch, params["seeds"])
            trained_by = run.run_that_wrote(FINETUNE_DIR / f"{name}.pt")
            per_seed[name] = []
            registered = None
            for seed in params["seeds"]:
                model = TiedAutoencoder.from_arch(arch)
                model.load_state_dict(ckpt["seeds"][seed])
                model.to(device).eval()
                codes = {split: batched(model.encode, data["clean"])
                         for split, data in (("train", train), ("val", val), ("test", test))}
                with run.seed(seed, f"evaluate {name}"):
                    classifier = train_classifier(
                        codes["train"], train["labels"], codes["val"], val["labels"], cfg["hidden"],
                        config, seed, desc=f"classifier {name} seed {seed}",
                        on_epoch=lambda row: run.log_metrics(
                            {f"classifier_{k}": v for k, v in row.items() if k != "epoch"},
                            step=row["epoch"]))
                    metrics = {
                        "mse": reconstruction_mse(model, test["clean"], test["clean"]),
                        "mse_noisy": reconstruction_mse(model, test["noisy"], test["clean"]),
                        "accuracy": accuracy(classifier, codes["test"], test["labels"]),
                        "accuracy_noisy": accuracy(classifier, batched(model.encode, test["noisy"]),
                                                   test["labels"]),
                    }
                    run.log_metrics(metrics)
                    model_uri = run.log_model(
                        f"{name}-seed{seed}", {"arch": arch, "state_dict": ckpt["seeds"][seed]}, metrics, example,
                        tags={"model": name, "seed": str(seed), "training_run_id": trained_by or "unknown"})
                    registered = registered or model_uri  # the first seed's model
                log.info("%s seed %d: %s", name, seed, {k: round(v, 5) for k, v in metrics.items()})
                per_seed[name].append(metrics)
            run.register(registered, registered_model_name(dataset, name), params["seeds"][0])

        summary = report.summarize(per_seed)
        run.log_metrics({f"{model}.{metric}": value for model, row in summary.items()
                         for metric, value in row.items()})
        write_json(REPORTS / "metrics.json", summary)
        frame = pd.DataFrame(report.table_rows(summary, with_slide=params["data"]["dataset"] == "mnist"))
        write_with(REPORTS / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
        table = report.markdown(summary, len(params["seeds"]), params["data"]["dataset"],
                                n_test=len(test["labels"]), n_val=len(val["labels"]))
        write_text(REPORTS / "results.md", table)
        for artifact in ("metrics.json", "results.csv", "results.md"):
            run.log_artifact(REPORTS / artifact)
        print(table)


if __name__ == "__main__":
    run_stage("evaluate", main)
