"""evaluate: the slide's table on the 10k test set, for every model and seed.

Writes reports/metrics.json (DVC metrics; the mean over seeds plus *_std keys),
reports/results.csv and reports/results.md (the slide's table with ours beside it).
With tracking on, it also logs every model of every seed as an MLflow model (dae/serving.py)
carrying its test metrics and linked to the run that trained it, and registers the first
seed's model of each kind as a new version of `dae-<dataset>-<model>` (alias `current` when
run in the workspace).
The classifiers train side by side, one worker process per model and seed (dae.parallel, as the
seeds of a training stage), each on one thread: the same results as one by one.
"""
import functools
from pathlib import Path

from stages import common
from stages.common import (FINETUNE_DIR, data_inputs, fit_config, load_checkpoint, load_params, load_split,
                           log, make_deterministic, run_stage, seed_workers, select_device)

SECTIONS = ["arch", "classifier", "seeds", "device", "data"]
REPORTS = Path("reports")


def main() -> None:
    import pandas as pd

    from dae import report
    from dae.io import write_json, write_text, write_with
    from dae.parallel import run_jobs
    from dae.params import MODELS, model_arch, section_flat
    from dae.tracking import registered_model_name, stage_run

    params = load_params(SECTIONS)
    device = select_device(params["device"])
    make_deterministic(device)
    config = fit_config(params, "classifier")
    seeds = params["seeds"]
    jobs = {}
    for name in MODELS:
        arch = model_arch(params, name)
        ckpt = load_checkpoint(FINETUNE_DIR / f"{name}.pt", arch, seeds)
        for seed in seeds:
            jobs[name, seed] = {"name": name, "seed": seed, "arch": arch, "state": ckpt["seeds"][seed],
                                "hidden": params["classifier"]["hidden"], "config": config,
                                "device": str(device)}
    workers = seed_workers(len(jobs), device, start=True)
    jobs = {key: job | {"progress": workers <= 1} for key, job in jobs.items()}
    val, test = evaluation_split("val", str(device)), evaluation_split("test", str(device))
    dataset = params["data"]["dataset"]
    example = test["noisy"][:2].cpu().numpy()  # the input example every logged model carries
    per_seed: dict[str, list[dict]] = {name: [] for name in MODELS}
    inputs = data_inputs(["train", "val", "test"])
    with stage_run("evaluate", section_flat(params, SECTIONS), inputs=inputs) as run:
        results = run_jobs(evaluate_model, jobs, workers=workers, log_format=common.LOG_FORMAT)
        for name in MODELS:
            trained_by = run.run_that_wrote(FINETUNE_DIR / f"{name}.pt")
            registered = None
            for seed in seeds:
                job, metrics = jobs[name, seed], results[name, seed]["metrics"]
                with run.seed(seed, f"evaluate {name}"):
                    for row in results[name, seed]["history"]:  # the classifier's epochs
                        run.log_metrics({f"classifier_{k}": v for k, v in row.items() if k != "epoch"},
                                        step=row["epoch"])
                    run.log_metrics(metrics)
                    model_uri = run.log_model(
                        f"{name}-seed{seed}", {"arch": job["arch"], "state_dict": job["state"]}, metrics, example,
                        tags={"model": name, "seed": str(seed), "training_run_id": trained_by or "unknown"})
                    registered = registered or model_uri  # the first seed's model
                log.info("%s seed %d: %s", name, seed, {k: round(v, 5) for k, v in metrics.items()})
                per_seed[name].append(metrics)
            run.register(registered, registered_model_name(dataset, name), seeds[0])

        summary = report.summarize(per_seed)
        run.log_metrics({f"{model}.{metric}": value for model, row in summary.items()
                         for metric, value in row.items()})
        write_json(REPORTS / "metrics.json", summary)
        frame = pd.DataFrame(report.table_rows(summary, with_slide=params["data"]["dataset"] == "mnist"))
        write_with(REPORTS / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
        table = report.markdown(summary, len(seeds), params["data"]["dataset"],
                                n_test=len(test["labels"]), n_val=len(val["labels"]))
        write_text(REPORTS / "results.md", table)
        for artifact in ("metrics.json", "results.csv", "results.md"):
            run.log_artifact(REPORTS / artifact)
        print(table)


@functools.lru_cache(maxsize=3)
def evaluation_split(split: str, device: str) -> dict:
    """One split, loaded once per process (also when the jobs run in the stage's own process).
    The classifiers train on clean codes: the noisy training images are left out."""
    import torch

    return load_split(split, torch.device(device), noisy=split != "train")


def evaluate_model(job: dict, send) -> dict:
    """One model of one seed (in a worker process when they run side by side; see dae.parallel):
    its test metrics and its classifier's epochs, {"metrics": {...}, "history": [...]}."""
    import torch

    from dae.evaluate import accuracy, batched, reconstruction_mse, train_classifier
    from dae.model import TiedAutoencoder

    device = torch.device(job["device"])
    make_deterministic(device)
    # One thread wherever it runs (in a worker or alone): a classifier's float sums depend on
    # the thread count, and its small steps gain nothing from a second thread (reports/method.md).
    torch.set_num_threads(1)
    train, val, test = (evaluation_split(split, job["device"]) for split in ("train", "val", "test"))
    model = TiedAutoencoder.from_arch(job["arch"])
    model.load_state_dict(job["state"])
    model.to(device).eval()
    codes = {split: batched(model.encode, data["clean"])
             for split, data in (("train", train), ("val", val), ("test", test))}
    history: list[dict] = []
    classifier = train_classifier(codes["train"], train["labels"], codes["val"], val["labels"], job["hidden"],
                                  job["config"], job["seed"], desc=f"classifier {job['name']} seed {job['seed']}",
                                  on_epoch=history.append, progress=job["progress"])
    metrics = {
        "mse": reconstruction_mse(model, test["clean"], test["clean"]),
        "mse_noisy": reconstruction_mse(model, test["noisy"], test["clean"]),
        "accuracy": accuracy(classifier, codes["test"], test["labels"]),
        "accuracy_noisy": accuracy(classifier, batched(model.encode, test["noisy"]), test["labels"]),
    }
    return {"metrics": metrics, "history": history}


if __name__ == "__main__":
    run_stage("evaluate", main)
