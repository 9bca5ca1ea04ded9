"""finetune: build the slide's four models and train them end to end.

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
is kept.

The models that share an architecture and an epoch count train as one stacked model, every seed
a member (dae.train.fit): random_ft and greedy_ft together, shallow on its own. The MLflow run
`finetune` has one nested run per model and seed (`finetune greedy_ft seed 0`).
"""
from __future__ import annotations

from stages.common import (CURVES_DIR, FINETUNE_DIR, PRETRAIN_DIR, clear_checkpoints, data_inputs, finish_members,
                           fit_config, load_checkpoint, load_params, load_split, log, make_deterministic,
                           run_stage, select_device, training_checkpoint, write_curve)

SECTIONS = ["arch", "noise", "finetune", "seeds", "device"]
STAGE = "finetune"
# Noisy training images whose means set the biases (bias_init: data_mean) and the offsets (center).
BIAS_INIT_SAMPLE = 10_000


def main() -> None:
    import json

    from dae.io import save_torch
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, MODELS, TRAINED_MODELS, model_arch, section_flat
    from dae.tracking import stage_run
    from dae.train import FitResult, evaluate_loss, reconstruction_loss, shared

    params = load_params(SECTIONS)
    seeds = params["seeds"]
    device = select_device(params["device"])
    make_deterministic(device)
    pretrained = load_checkpoint(PRETRAIN_DIR / f"layer_{DEEP_LAYERS}.pt", model_arch(params, "greedy"), seeds)
    # One stack per architecture and epoch count (the rest of the recipe is shared by all).
    groups: dict[str, list[str]] = {}
    for name in TRAINED_MODELS:
        key = json.dumps([model_arch(params, name), fit_config(params, "finetune", name).epochs])
        groups.setdefault(key, []).append(name)
    train, val = load_split("train", device), load_split("val", device)

    with stage_run(STAGE, section_flat(params, SECTIONS), inputs=data_inputs(["train", "val"])) as run, \
            run.member_runs() as runs:
        trained: dict[str, list[tuple[str, dict, FitResult]]] = {}  # model -> (run, state, result) per seed
        # greedy: the pretrained stack as it is; its losses are recorded, nothing is trained.
        for seed in seeds:
            model = TiedAutoencoder.from_arch(model_arch(params, "greedy"))
            model.load_state_dict(pretrained["seeds"][seed])
            stacked = TiedAutoencoder.stacked([model.to(device)])
            row = {"epoch": 0, **{f"{split}_loss": evaluate_loss(stacked, reconstruction_loss, (
                shared(d["noisy"], 1), shared(d["clean"], 1)))[0] for split, d in (("train", train), ("val", val))}}
            key = runs.start(f"{STAGE} greedy seed {seed}", seed, {"model": "greedy"})
            trained.setdefault("greedy", []).append(
                (key, model.cpu().state_dict(), FitResult([row], best_epoch=0, best_val_loss=row["val_loss"])))
        for names in groups.values():
            members = [(name, seed) for name in names for seed in seeds]
            keys = [runs.start(f"{STAGE} {name} seed {seed}", seed, {"model": name}) for name, seed in members]
            states_results = train_stack(params, members, keys, pretrained, train, val, device,
                                         runs.epoch_logger(keys))
            for (name, _), key, (state, result) in zip(members, keys, states_results):
                trained.setdefault(name, []).append((key, state, result))
        for name in MODELS:
            path, curve = FINETUNE_DIR / f"{name}.pt", CURVES_DIR / f"finetune_{name}.csv"
            keys, states, results = zip(*trained[name])
            save_torch(path, {"model": name, "arch": model_arch(params, name), "seeds": dict(zip(seeds, states))})
            write_curve(curve, [result.history for result in results])
            run.log_artifact(curve)
            finish_members(runs, list(keys), list(results), path)
    clear_checkpoints(STAGE)


def train_stack(params: dict, members: list[tuple[str, int]], keys: list[str], pretrained: dict, train: dict,
                val: dict, device, on_epoch) -> list[tuple[dict, "FitResult"]]:
    """Train the (model, seed) `members`, all of one architecture and epoch count, as one stacked
    model; returns each member's (best state_dict, FitResult)."""
    import torch

    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import model_arch
    from dae.train import fit, reconstruction_loss, shared

    cfg, noise = params["finetune"], params["noise"]
    bias_sample = train["noisy"][:BIAS_INIT_SAMPLE].clone()
    models = []
    for name, seed in members:
        model = TiedAutoencoder.from_arch(model_arch(params, name))
        if name == "greedy_ft":
            model.load_state_dict(pretrained["seeds"][seed])
        else:
            model.reset_parameters(cfg["init_gain"], torch.Generator().manual_seed(seed))
        model.to(device)
        if name != "greedy_ft" and cfg["bias_init"] == "data_mean":
            model.center_biases(bias_sample)
        models.append(model)
    model = TiedAutoencoder.stacked(models)
    m = len(members)
    if cfg["fresh_noise"]:
        # A fixed noisy copy lets the deep models memorise its noise (train loss well below
        # validation loss); fresh corruption every epoch, as in Vincent et al. 2008, does not.
        train_inputs = (shared(train["clean"], m),)

        def augment(batch, generators):
            clean = batch[0]
            noisy = torch.stack([corrupt(clean[i], noise["type"], noise["level"], generator, noise["clip"])
                                 for i, generator in enumerate(generators)])
            return noisy, clean
    else:
        train_inputs, augment = (shared(train["noisy"], m), shared(train["clean"], m)), None
    name = "+".join(dict.fromkeys(member for member, _ in members))
    checkpoint, fingerprint = training_checkpoint(STAGE, name, params, model, train_inputs[0])
    # Offsets recomputed at the start of every epoch: the layer means move as the model trains.
    centered = (lambda: model.centered(bias_sample)) if cfg["center"] else None
    results = fit(model, reconstruction_loss, train_inputs, (shared(val["noisy"], m), shared(val["clean"], m)),
                  fit_config(params, "finetune", members[0][0]), seeds=[seed for _, seed in members], desc=keys,
                  augment=augment, epoch_context=centered, checkpoint=checkpoint, fingerprint=fingerprint,
                  on_epoch=on_epoch)
    for key, result in zip(keys, results):
        log.info("%s: best val loss %.5f at epoch %d", key, result.best_val_loss, result.best_epoch)
    return [(plain.state_dict(), result) for plain, result in zip(model.unstacked(), results)]


if __name__ == "__main__":
    run_stage("finetune", main)
