"""finetune MODEL: build one of the slide's four models and train it end to end.

shallow   1+1: 784 -> bottleneck, random init, trained end to end
greedy    8+8: the pretrained stack of data/models/pretrain/layer_8.pt, no further training
random_ft 8+8: random init, trained end to end
greedy_ft 8+8: initialised from the pretrained stack, trained end to end
Random init is Glorot-uniform weights (finetune.init_gain) and, with finetune.bias_init
data_mean, biases set from the means of the noisy training images (TiedAutoencoder.center_biases).
Training reconstructs the clean image from a noisy copy: with finetune.fresh_noise, a new
corruption (same type and level as the noise stage) of every batch, else the noise stage's fixed
copy. Validation always uses the fixed copy; the best validation epoch is kept.
"""
import argparse

from stages.common import (CURVES_DIR, FINETUNE_DIR, PRETRAIN_DIR, clear_checkpoints, data_inputs, fit_config,
                           load_checkpoint, load_params, log, make_deterministic, run_stage, select_device,
                           training_checkpoint, write_trained)

SECTIONS = ["arch", "noise", "finetune", "seeds", "device"]
BIAS_INIT_SAMPLE = 10_000  # noisy training images whose means set the biases (bias_init: data_mean)


def main() -> None:
    import torch

    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import DEEP_LAYERS, MODELS, model_arch, section_flat
    from dae.tracking import stage_run
    from dae.train import evaluate_loss, fit, reconstruction_loss
    from stages.common import load_split

    parser = argparse.ArgumentParser(prog="python -m stages.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    name = parser.parse_args().model
    params = load_params(SECTIONS)
    device = select_device(params["device"])
    make_deterministic(device)
    cfg = params["finetune"]
    config = fit_config(params, "finetune", name) if name != "greedy" else None  # greedy trains nothing
    arch = model_arch(params, name)
    pretrained = (load_checkpoint(PRETRAIN_DIR / f"layer_{DEEP_LAYERS}.pt", arch, params["seeds"])
                  if name in ("greedy", "greedy_ft") else None)
    train, val = load_split("train", device), load_split("val", device)
    noise = params["noise"]
    if cfg["fresh_noise"]:
        # A fixed noisy copy lets the deep models memorise its noise (train loss well below
        # validation loss); fresh corruption every epoch, as in Vincent et al. 2008, does not.
        train_inputs = (train["clean"],)

        def augment(batch, generator):
            return corrupt(batch[0], noise["type"], noise["level"], generator, noise["clip"]), batch[0]
    else:
        train_inputs, augment = (train["noisy"], train["clean"]), None

    stage = f"finetune@{name}"
    states, histories = {}, []
    with stage_run(stage, section_flat(params, SECTIONS) | {"model": name},
                   inputs=data_inputs(["train", "val"])) as run:
        for seed in params["seeds"]:
            torch.manual_seed(seed)
            model = TiedAutoencoder.from_arch(arch)
            if pretrained is not None:
                model.load_state_dict(pretrained["seeds"][seed])
            else:
                model.reset_parameters(cfg["init_gain"], torch.Generator().manual_seed(seed))
            model.to(device)
            if pretrained is None and cfg["bias_init"] == "data_mean":
                model.center_biases(train["noisy"][:BIAS_INIT_SAMPLE])
            with run.seed(seed, stage):
                if name == "greedy":  # the pretrained stack as it is: record its losses only
                    history = [{"epoch": 0, **{f"{split}_loss": evaluate_loss(
                        model, reconstruction_loss, (data["noisy"], data["clean"]))
                        for split, data in (("train", train), ("val", val))}}]
                    run.log_metrics({"best_val_loss": history[0]["val_loss"]})
                else:
                    checkpoint, fingerprint = training_checkpoint(stage, seed, params, model, train_inputs[0])
                    result = fit(model, reconstruction_loss, train_inputs,
                                 (val["noisy"], val["clean"]), config, seed=seed,
                                 desc=f"{stage} seed {seed}", augment=augment,
                                 checkpoint=checkpoint, fingerprint=fingerprint,
                                 on_epoch=lambda row: run.log_metrics(row, step=row["epoch"]))
                    history = result.history
                    run.log_metrics({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
                    log.info("seed %d: best val loss %.5f at epoch %d", seed, result.best_val_loss,
                             result.best_epoch)
            states[seed] = model.cpu().state_dict()
            histories.append(history)
        write_trained(run, FINETUNE_DIR / f"{name}.pt", {"model": name, "arch": arch, "seeds": states},
                      CURVES_DIR / f"finetune_{name}.csv", histories)
    clear_checkpoints(stage)


if __name__ == "__main__":
    run_stage("finetune", main)
