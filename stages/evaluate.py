"""evaluate: the slide's table on the test set, for every model and seed.

Writes METRICS (DVC metrics: the mean over seeds plus *_std keys), CSV and TABLE (the slide's
table with ours beside it), with a PCA row: the linear code of the same size (arch.bottleneck),
fit on the clean training images, and the same classifier on its codes.
With tracking on, it also logs every model of every seed as an MLflow model (dae/serving.py)
carrying its test metrics and linked to the run that trained it, and registers the first
seed's model of each kind as a new version of `dae-<dataset>-<model>` (alias `current` when
run in the workspace).
The classifiers of every model and seed train at once, as one stacked model (dae.train.fit).
"""
from stages.common import load_params, log, parser, run_stage


def main(args, name: str) -> None:
    from pathlib import Path

    import pandas as pd
    import torch

    from dae import report
    from dae.checkpoint import load_checkpoint
    from dae.device import make_deterministic, select_device
    from dae.evaluate import PCACode, accuracy, reconstruction_metrics, train_classifiers
    from dae.io import write_json, write_text, write_with
    from dae.model import TiedAutoencoder
    from dae.params import MODELS, model_arch, section_flat
    from dae.splits import load_split
    from dae.tracking import dataset_inputs, registered_model_name, stage_run
    from dae.train import FitConfig, apply_in_batches
    from stages.common import tracking_root

    params, sections = load_params("evaluate")
    device = select_device(params["device"])
    make_deterministic(device)
    seeds, dataset = params["seeds"], params["data"]["dataset"]
    # The classifiers train on clean codes: the noisy training images are left out.
    train, val, test = (load_split(args.data, split, device, noisy=split != "train") for split in ("train", "val", "test"))
    inputs = {"train": train["clean"], "val": val["clean"], "test": test["clean"], "test_noisy": test["noisy"]}
    members, states, metrics, codes = [], {}, {}, {split: [] for split in inputs}

    def add(member: tuple[str, int], encoder) -> None:
        members.append(member)
        for split, images in inputs.items():
            codes[split].append(apply_in_batches(encoder.encode, images))

    for model_name in MODELS:
        arch = model_arch(params, model_name)
        ckpt = load_checkpoint(Path(args.models) / f"{model_name}.pt", arch, seeds)
        for seed in seeds:
            model = TiedAutoencoder.from_arch(arch)
            model.load_state_dict(ckpt["seeds"][seed])
            states[model_name, seed] = ckpt["seeds"][seed]
            metrics[model_name, seed] = reconstruction_metrics(model.to(device).eval(), test)
            add((model_name, seed), model)
    # The linear baseline, on the same splits and with the same classifiers (one per seed).
    pca = PCACode(train["clean"], params["arch"]["bottleneck"])
    for seed in seeds:
        metrics["pca", seed] = reconstruction_metrics(pca, test)
        add(("pca", seed), pca)
    codes = {split: torch.stack(per_member) for split, per_member in codes.items()}
    example = test["noisy"][:2].cpu().numpy()  # the input example every logged model carries
    root, in_workspace = tracking_root()
    with stage_run(name, section_flat(params, sections), root, in_workspace,
                   dataset_inputs(params["data"], params["noise"], ["train", "val", "test"])) as run, \
            run.member_runs() as runs:
        # Every model's and seed's classifier at once, stacked (seed s of each model: seed s's init).
        histories: list[list[dict]] = [[] for _ in members]

        def record(rows: list[dict]) -> None:
            for history, row in zip(histories, rows):
                history.append(row)

        classifiers = train_classifiers(
            codes["train"], train["labels"], codes["val"], val["labels"], params["classifier"]["hidden"],
            FitConfig.from_section(params["classifier"]), [seed for _, seed in members],
            [f"classifier {model} seed {seed}" for model, seed in members], on_epoch=record)
        for kind, split in (("accuracy", "test"), ("accuracy_noisy", "test_noisy")):
            for member, value in zip(members, accuracy(classifiers, codes[split], test["labels"])):
                metrics[member][kind] = value
        for model_name in MODELS:
            registered = None
            for seed in seeds:
                member_metrics = metrics[model_name, seed]
                trained_by = run.run_that_wrote(Path(args.models) / f"{model_name}.pt", seed)
                key = runs.start(f"{name} {model_name} seed {seed}", seed, {"model": model_name})
                for row in histories[members.index((model_name, seed))]:  # the classifier's epochs
                    runs.log(key, {f"classifier_{k}": v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
                runs.log(key, member_metrics)
                model_uri = runs.log_model(
                    key, f"{model_name}-seed{seed}", {"arch": model_arch(params, model_name),
                                                      "state_dict": states[model_name, seed]},
                    member_metrics, example,
                    tags={"model": model_name, "seed": str(seed), "training_run_id": trained_by or "unknown"})
                runs.finish(key)
                registered = registered or model_uri  # the first seed's model
                log.info("%s seed %d: %s", model_name, seed, {k: round(v, 5) for k, v in member_metrics.items()})
            run.register(registered, registered_model_name(dataset, model_name), seeds[0])

        summary = report.summarize({model: [metrics[model, seed] for seed in seeds] for model in (*MODELS, "pca")})
        run.log_metrics({f"{model}.{metric}": value for model, row in summary.items() for metric, value in row.items()})
        frame = pd.DataFrame(report.table_rows(summary, with_slide=dataset == "mnist"))
        table = report.markdown(summary, len(seeds), dataset, n_test=len(test["labels"]), n_val=len(val["labels"]),
                                code_dim=params["arch"]["bottleneck"])
        write_json(args.metrics, summary)
        write_with(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
        write_text(args.table, table)
        for artifact in (args.metrics, args.csv, args.table):
            run.log_artifact(artifact)
        print(table)


if __name__ == "__main__":
    cli = parser(__doc__, "stages.evaluate")
    cli.add_argument("--data", required=True, help="folder of the noise stage's splits")
    cli.add_argument("--models", required=True, help="folder of finetune's <model>.pt")
    cli.add_argument("--metrics", required=True, help="the JSON of DVC metrics to write")
    cli.add_argument("--csv", required=True, help="the results table as CSV, to write")
    cli.add_argument("--table", required=True, help="the results table as Markdown, to write")
    run_stage("evaluate", cli, main)
