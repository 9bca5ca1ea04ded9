"""finetune [MODEL ...]: build the slide's four models (or those named) and train them end to end.

shallow   1+1: 784 -> bottleneck, random init, trained end to end
greedy    8+8: the pretrained stack of data/models/pretrain/layer_8.pt, no further training
random_ft 8+8: random init, trained end to end
greedy_ft 8+8: initialised from the pretrained stack, trained end to end
Random init is Glorot-uniform weights (finetune.init_gain) and, with finetune.bias_init
data_mean, biases set from the means of the noisy training images (TiedAutoencoder.center_biases).
Training reconstructs the clean image from a noisy copy: with finetune.fresh_noise, a new
corruption (same type and level as the noise stage) of every batch, else the noise stage's fixed
copy. With finetune.center, every epoch trains in the centred parametrisation
(TiedAutoencoder.centered), its offsets the layer means over the same noisy training images; the
model written is the plain one. Validation always uses the fixed copy; the best validation epoch
is kept. The seeds train side by side, one process each (stages.common.train_seeds; the same
results).

Each model is its own process, `python -m stages.finetune MODEL`, with its own MLflow run
(`finetune@MODEL`). Several models run side by side when the seeds leave workers free
(dae.parallel.lane_count): with one seed on a 2-core CPU all four at once, on one thread each,
since one model gains little from a second core. A model does not depend on the thread count
that trained it (tests/test_parallel.py), so this changes no result, only the wait.
"""
import argparse
import os
import sys

from stages.common import (CURVES_DIR, FINETUNE_DIR, PRETRAIN_DIR, clear_checkpoints, data_inputs, fit_config,
                           load_checkpoint, load_params, load_split, log, make_deterministic, model_state,
                           run_stage, seed_workers, select_device, train_seeds, training_checkpoint,
                           write_trained)

SECTIONS = ["arch", "noise", "finetune", "seeds", "device"]
# Noisy training images whose means set the biases (bias_init: data_mean) and the offsets (center).
BIAS_INIT_SAMPLE = 10_000
# Side by side, the longest start first (they take the lanes that free up last).
LAUNCH_ORDER = ("random_ft", "greedy_ft", "shallow", "greedy")


def main() -> None:
    from dae.params import MODELS

    parser = argparse.ArgumentParser(prog="python -m stages.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: all four)")
    names = list(dict.fromkeys(parser.parse_args().models)) or list(MODELS)
    unknown = [name for name in names if name not in MODELS]
    if unknown:  # (argparse's `choices` rejects an empty list of a nargs="*" argument)
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if len(names) == 1:
        train_model(names[0])
    else:
        train_models(names)


def train_models(names: list[str]) -> None:
    """Every model in `names`, each as `python -m stages.finetune MODEL`, side by side as far as
    the seeds leave workers free (see the module's docstring)."""
    from dae.parallel import PROGRESS_ENV, lane_count, run_commands, threads_per_worker

    params = load_params(SECTIONS)  # a bad params.yaml fails here, before any model starts
    for name in names:
        if name != "greedy":
            fit_config(params, "finetune", name)
    device = select_device(params["device"])
    try:
        lanes = lane_count(len(names), len(params["seeds"]), device.type)
    except ValueError as exc:  # a bad $DAE_SEED_WORKERS
        from dae.params import ParamError

        raise ParamError(str(exc)) from None
    env = dict(os.environ)
    if lanes > 1:
        # Each model on its share of the cores; the seeds' workers set their own (dae.parallel).
        env |= {"OMP_NUM_THREADS": str(threads_per_worker(lanes)), PROGRESS_ENV: "off"}
    ordered = sorted(names, key=LAUNCH_ORDER.index)
    log.info("training %s, %d at a time%s", ", ".join(ordered), lanes,
             f" ({env['OMP_NUM_THREADS']} thread(s) each)" if lanes > 1 else "")
    run_commands({f"finetune@{name}": [sys.executable, "-m", "stages.finetune", name] for name in ordered},
                 lanes=lanes, env=env)


def train_model(name: str) -> None:
    """One model, all its seeds, in its own MLflow run `finetune@{name}`."""
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, model_arch, section_flat
    from dae.tracking import stage_run
    from dae.train import evaluate_loss, reconstruction_loss

    params = load_params(SECTIONS)
    device = select_device(params["device"])
    make_deterministic(device)
    if name != "greedy":
        fit_config(params, "finetune", name)  # a bad section fails here, before any process starts
        seed_workers(len(params["seeds"]), device, start=True)
    arch = model_arch(params, name)
    pretrained = (load_checkpoint(PRETRAIN_DIR / f"layer_{DEEP_LAYERS}.pt", arch, params["seeds"])
                  if name in ("greedy", "greedy_ft") else None)

    stage = f"finetune@{name}"
    with stage_run(stage, section_flat(params, SECTIONS) | {"model": name},
                   inputs=data_inputs(["train", "val"])) as run:
        if name == "greedy":  # the pretrained stack as it is: record its losses only
            train, val = load_split("train", device), load_split("val", device)
            states, histories = {}, []
            for seed in params["seeds"]:
                model = TiedAutoencoder.from_arch(arch)
                model.load_state_dict(pretrained["seeds"][seed])
                model.to(device)
                with run.seed(seed, stage):
                    history = [{"epoch": 0, **{f"{split}_loss": evaluate_loss(
                        model, reconstruction_loss, (data["noisy"], data["clean"]))
                        for split, data in (("train", train), ("val", val))}}]
                    run.log_metrics({"best_val_loss": history[0]["val_loss"]})
                states[seed] = model.cpu().state_dict()
                histories.append(history)
        else:
            jobs = {seed: {"params": params, "name": name, "seed": seed, "device": str(device),
                           "pretrained": pretrained["seeds"][seed] if pretrained else None}
                    for seed in params["seeds"]}
            results = train_seeds(run, stage, train_seed, jobs, device)
            states = {seed: model_state(arch, results[seed]["state"]) for seed in params["seeds"]}
            histories = [results[seed]["history"] for seed in params["seeds"]]
        write_trained(run, FINETUNE_DIR / f"{name}.pt", {"model": name, "arch": arch, "seeds": states},
                      CURVES_DIR / f"finetune_{name}.csv", histories)
    clear_checkpoints(stage)


def train_seed(job: dict, send) -> dict:
    """Fine-tune one seed's model (in a worker process when seeds train side by side; see
    stages.common.train_seeds): {"state": its best state_dict, "history": its epochs}."""
    import torch

    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import model_arch
    from dae.train import fit, reconstruction_loss

    params, name, seed = job["params"], job["name"], job["seed"]
    device = torch.device(job["device"])
    make_deterministic(device)
    cfg, noise = params["finetune"], params["noise"]
    train, val = load_split("train", device), load_split("val", device)
    bias_sample = train["noisy"][:BIAS_INIT_SAMPLE].clone()
    if cfg["fresh_noise"]:
        # A fixed noisy copy lets the deep models memorise its noise (train loss well below
        # validation loss); fresh corruption every epoch, as in Vincent et al. 2008, does not.
        train_inputs = (train["clean"],)

        def augment(batch, generator):
            return corrupt(batch[0], noise["type"], noise["level"], generator, noise["clip"]), batch[0]
    else:
        train_inputs, augment = (train["noisy"], train["clean"]), None
    del train  # what training does not read is freed (each worker holds its own copy of the data)

    torch.manual_seed(seed)
    model = TiedAutoencoder.from_arch(model_arch(params, name))
    if job["pretrained"] is not None:
        model.load_state_dict(job["pretrained"])
    else:
        model.reset_parameters(cfg["init_gain"], torch.Generator().manual_seed(seed))
    model.to(device)
    if job["pretrained"] is None and cfg["bias_init"] == "data_mean":
        model.center_biases(bias_sample)
    stage = f"finetune@{name}"
    checkpoint, fingerprint = training_checkpoint(stage, seed, params, model, train_inputs[0])
    send("start", None)
    # Offsets recomputed at the start of every epoch: the layer means move as the model trains.
    centered = (lambda: model.centered(bias_sample)) if cfg["center"] else None
    result = fit(model, reconstruction_loss, train_inputs, (val["noisy"], val["clean"]),
                 fit_config(params, "finetune", name), seed=seed, desc=f"{stage} seed {seed}",
                 augment=augment, epoch_context=centered, checkpoint=checkpoint,
                 fingerprint=fingerprint, on_epoch=lambda row: send("epoch", row),
                 progress=job["progress"])
    send("done", {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
    log.info("seed %d: best val loss %.5f at epoch %d", seed, result.best_val_loss, result.best_epoch)
    return {"state": model.cpu().state_dict(), "history": result.history}


if __name__ == "__main__":
    run_stage("finetune", main)
