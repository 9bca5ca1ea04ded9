"""The slide's models trained end to end: a stack of (model, seed) members initialised by the
recipe, and the pretrained stack's losses as they are (the greedy model, which trains no further)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from dae.checkpoint import resume_state
from dae.model import TiedAutoencoder
from dae.noise import corrupt
from dae.params import model_arch
from dae.train import FitConfig, FitResult, evaluate_loss, fit, reconstruction_loss, shared

# Noisy training images whose means set the biases (bias_init: data_mean) and the offsets (center).
BIAS_INIT_SAMPLE = 10_000


def evaluate_pretrained(params: dict, state: dict, train: dict, val: dict,
                        device: torch.device) -> tuple[dict, FitResult]:
    """The greedy model: one seed's pretrained stack as it is, with its train and validation loss
    as a one-row history (epoch 0)."""
    model = TiedAutoencoder.from_arch(model_arch(params, "greedy"))
    model.load_state_dict(state)
    stacked = TiedAutoencoder.stacked([model.to(device)])
    row = {"epoch": 0, **{f"{split}_loss": evaluate_loss(stacked, reconstruction_loss, (
        shared(d["noisy"], 1), shared(d["clean"], 1)))[0] for split, d in (("train", train), ("val", val))}}
    return model.cpu().state_dict(), FitResult([row], best_epoch=0, best_val_loss=row["val_loss"])


def finetune_stack(params: dict, members: list[tuple[str, int]], pretrained: dict, train: dict, val: dict,
                   device: torch.device, desc: list[str], resume: Path | None = None,
                   on_epoch: Callable | None = None) -> list[tuple[dict, FitResult]]:
    """Train the (model, seed) `members`, all of one architecture and epoch count, as one stacked
    model; returns each member's (best state_dict, FitResult).

    Random init is Glorot-uniform weights (finetune.init_gain) and, with finetune.bias_init
    data_mean, biases set from the means of the noisy training images; greedy_ft starts from
    `pretrained`. Training reconstructs the clean image from a noisy copy: with
    finetune.fresh_noise, a new corruption (the noise section's type and level) of every batch,
    else the fixed copy. With finetune.center, every epoch trains in the centred parametrisation
    (TiedAutoencoder.centered); the model returned is the plain one. Validation uses the fixed
    copy. `resume`: the folder of the per-epoch state that an interrupted run resumes from."""
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
    checkpoint, fingerprint = None, ""
    if resume is not None:
        name = "+".join(f"{model}-seed{seed}" for model, seed in members)
        checkpoint, fingerprint = resume_state(resume, name, params, model, train_inputs[0])
    # Offsets recomputed at the start of every epoch: the layer means move as the model trains.
    centered = (lambda: model.centered(bias_sample)) if cfg["center"] else None
    results = fit(model, reconstruction_loss, train_inputs, (shared(val["noisy"], m), shared(val["clean"], m)),
                  FitConfig.from_section(cfg, members[0][0]), seeds=[seed for _, seed in members], desc=desc,
                  augment=augment, epoch_context=centered, checkpoint=checkpoint, fingerprint=fingerprint,
                  on_epoch=on_epoch)
    return [(plain.state_dict(), result) for plain, result in zip(model.unstacked(), results)]
