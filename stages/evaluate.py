"""evaluate: the slide's table on the 10k test set, for every model and seed.

Writes reports/metrics.json (DVC metrics; the mean over seeds plus *_std keys),
reports/results.csv and reports/results.md (the slide's table with ours beside it), with a PCA
row: the linear code of the same size (arch.bottleneck), fit on the clean training images, and
the same classifier on its codes.
With tracking on, it also logs every model of every seed as an MLflow model (dae/serving.py)
carrying its test metrics and linked to the run that trained it, and registers the first
seed's model of each kind as a new version of `dae-<dataset>-<model>` (alias `current` when
run in the workspace).
The classifiers of every model and seed train at once, as one stacked model (dae.train.fit).
"""
from pathlib import Path

from stages.common import (FINETUNE_DIR, data_inputs, fit_config, load_checkpoint, load_params, load_split, log,
                           make_deterministic, run_stage, select_device)

SECTIONS = ["arch", "classifier", "seeds", "device", "data"]
REPORTS = Path("reports")


def main() -> None:
    import pandas as pd
    import torch

    from dae import report
    from dae.evaluate import PCACode, accuracy, batched, reconstruction_mse, train_classifiers
    from dae.io import write_json, write_text, write_with
    from dae.model import TiedAutoencoder
    from dae.params import MODELS, model_arch, section_flat
    from dae.tracking import registered_model_name, stage_run

    params = load_params(SECTIONS)
    device = select_device(params["device"])
    make_deterministic(device)
    config = fit_config(params, "classifier")
    seeds = params["seeds"]
    # The classifiers train on clean codes: the noisy training images are left out.
    train, val, test = (load_split(split, device, noisy=split != "train") for split in ("train", "val", "test"))
    members, states, metrics, codes = [], {}, {}, {"train": [], "val": [], "test": [], "test_noisy": []}
    for name in MODELS:
        arch = model_arch(params, name)
        ckpt = load_checkpoint(FINETUNE_DIR / f"{name}.pt", arch, seeds)
        for seed in seeds:
            model = TiedAutoencoder.from_arch(arch)
            model.load_state_dict(ckpt["seeds"][seed])
            model.to(device).eval()
            members.append((name, seed))
            states[name, seed] = ckpt["seeds"][seed]
            metrics[name, seed] = {"mse": reconstruction_mse(model, test["clean"], test["clean"]),
                                   "mse_noisy": reconstruction_mse(model, test["noisy"], test["clean"])}
            for split, images in (("train", train["clean"]), ("val", val["clean"]), ("test", test["clean"]),
                                  ("test_noisy", test["noisy"])):
                codes[split].append(batched(model.encode, images))
    # The linear baseline, on the same splits and with the same classifiers (one per seed).
    pca = PCACode(train["clean"], params["arch"]["bottleneck"])
    pca_metrics = {"mse": reconstruction_mse(pca, test["clean"], test["clean"]),
                   "mse_noisy": reconstruction_mse(pca, test["noisy"], test["clean"])}
    for seed in seeds:
        members.append(("pca", seed))
        metrics["pca", seed] = dict(pca_metrics)
        for split, images in (("train", train["clean"]), ("val", val["clean"]), ("test", test["clean"]),
                              ("test_noisy", test["noisy"])):
            codes[split].append(batched(pca.encode, images))
    codes = {split: torch.stack(per_member) for split, per_member in codes.items()}
    dataset = params["data"]["dataset"]
    example = test["noisy"][:2].cpu().numpy()  # the input example every logged model carries
    with stage_run("evaluate", section_flat(params, SECTIONS), inputs=data_inputs(["train", "val", "test"])) as run:
        # Every model's and seed's classifier at once, stacked (seed s of each model: seed s's init).
        histories: list[list[dict]] = [[] for _ in members]

        def record(rows: list[dict]) -> None:
            for history, row in zip(histories, rows):
                history.append(row)

        classifiers = train_classifiers(
            codes["train"], train["labels"], codes["val"], val["labels"], params["classifier"]["hidden"], config,
            [seed for _, seed in members], [f"classifier {name} seed {seed}" for name, seed in members],
            on_epoch=record)
        for kind, split in (("accuracy", "test"), ("accuracy_noisy", "test_noisy")):
            for member, value in zip(members, accuracy(classifiers, codes[split], test["labels"])):
                metrics[member][kind] = value
        per_seed: dict[str, list[dict]] = {name: [] for name in MODELS}
        per_seed["pca"] = [metrics["pca", seed] for seed in seeds]
        for name in MODELS:
            registered = None
            for seed in seeds:
                member_metrics = metrics[name, seed]
                trained_by = run.run_that_wrote(FINETUNE_DIR / f"{name}.pt", seed)
                with run.seed(seed, f"evaluate {name}"):
                    for row in histories[members.index((name, seed))]:  # the classifier's epochs
                        run.log_metrics({f"classifier_{k}": v for k, v in row.items() if k != "epoch"},
                                        step=row["epoch"])
                    run.log_metrics(member_metrics)
                    model_uri = run.log_model(
                        f"{name}-seed{seed}", {"arch": model_arch(params, name), "state_dict": states[name, seed]},
                        member_metrics, example,
                        tags={"model": name, "seed": str(seed), "training_run_id": trained_by or "unknown"})
                    registered = registered or model_uri  # the first seed's model
                log.info("%s seed %d: %s", name, seed, {k: round(v, 5) for k, v in member_metrics.items()})
                per_seed[name].append(member_metrics)
            run.register(registered, registered_model_name(dataset, name), seeds[0])

        summary = report.summarize(per_seed)
        run.log_metrics({f"{model}.{metric}": value for model, row in summary.items()
                         for metric, value in row.items()})
        write_json(REPORTS / "metrics.json", summary)
        frame = pd.DataFrame(report.table_rows(summary, with_slide=params["data"]["dataset"] == "mnist"))
        write_with(REPORTS / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
        table = report.markdown(summary, len(seeds), params["data"]["dataset"], n_test=len(test["labels"]),
                                n_val=len(val["labels"]), code_dim=params["arch"]["bottleneck"])
        write_text(REPORTS / "results.md", table)
        for artifact in ("metrics.json", "results.csv", "results.md"):
            run.log_artifact(REPORTS / artifact)
        print(table)


if __name__ == "__main__":
    run_stage("evaluate", main)
