"""pretrain_layer k: greedy layer-wise pretraining of layer k of the deep encoder.

Layer k is a one-layer tied-weight denoising autoencoder trained on the codes of layers
1..k-1 (noisy codes in, clean codes as target); those codes are computed once. The output
checkpoint holds the whole stack 1..k for every seed, so stage k+1 depends on this file alone.
"""
import argparse

from stages.common import (CURVES_DIR, PRETRAIN_DIR, clear_checkpoints, data_inputs, fit_config, load_checkpoint,
                           load_params, log, make_deterministic, run_stage, select_device, training_checkpoint,
                           write_trained)

SECTIONS = ["arch", "pretrain", "seeds", "device"]


def main() -> None:
    import torch

    from dae.evaluate import batched
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, deep_sizes, section_flat
    from dae.tracking import stage_run
    from dae.train import fit, reconstruction_loss
    from stages.common import load_split

    parser = argparse.ArgumentParser(prog="python -m stages.pretrain_layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layer", type=int, help=f"layer number, 1..{DEEP_LAYERS}")
    k = parser.parse_args().layer
    params = load_params(SECTIONS)
    if not 1 <= k <= DEEP_LAYERS:
        raise SystemExit(f"layer must be in 1..{DEEP_LAYERS}, got {k}")
    sizes, linear_code = deep_sizes(params), params["arch"]["linear_code"]
    activation = params["arch"]["activation"]
    device = select_device(params["device"])
    make_deterministic(device)
    cfg = params["pretrain"]
    config = fit_config(params, "pretrain")
    prev_arch = {"sizes": sizes[:k], "linear_code": False, "activation": activation, "output_sigmoid": True}
    prev = load_checkpoint(PRETRAIN_DIR / f"layer_{k - 1}.pt", prev_arch, params["seeds"]) if k > 1 else None
    train, val = load_split("train", device), load_split("val", device)

    stage = f"pretrain_layer@{k}"
    stacks, histories = {}, []
    with stage_run(stage, section_flat(params, SECTIONS) | {"layer": k},
                   inputs=data_inputs(["train", "val"])) as run:
        for seed in params["seeds"]:
            torch.manual_seed(seed)
            if prev is not None:
                below = TiedAutoencoder.from_arch(prev_arch)
                below.load_state_dict(prev["seeds"][seed])
                below.to(device).eval()
                layers = [below.layer(i) for i in range(k - 1)]
                codes = {split: {kind: batched(below.encode, data[kind]) for kind in ("noisy", "clean")}
                         for split, data in (("train", train), ("val", val))}
            else:
                layers, codes = [], {"train": train, "val": val}
            # Layer 1 reconstructs pixels (sigmoid output); deeper layers reconstruct hidden codes.
            layer = TiedAutoencoder(sizes[k - 1:k + 1], linear_code and k == DEEP_LAYERS, activation,
                                    output_sigmoid=k == 1)
            layer.reset_parameters(cfg["init_gain"], torch.Generator().manual_seed(seed))
            layer.to(device)
            checkpoint, fingerprint = training_checkpoint(stage, seed, params, layer, codes["train"]["noisy"])
            with run.seed(seed, stage):
                result = fit(layer, reconstruction_loss,
                             (codes["train"]["noisy"], codes["train"]["clean"]),
                             (codes["val"]["noisy"], codes["val"]["clean"]), config, seed=seed,
                             desc=f"{stage} seed {seed}", checkpoint=checkpoint, fingerprint=fingerprint,
                             on_epoch=lambda row: run.log_metrics(row, step=row["epoch"]))
                run.log_metrics({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
            stacks[seed] = TiedAutoencoder.stack(layers + [layer]).cpu().state_dict()
            histories.append(result.history)
            log.info("seed %d: best val loss %.5f at epoch %d", seed, result.best_val_loss, result.best_epoch)
        arch = {"sizes": sizes[:k + 1], "linear_code": linear_code and k == DEEP_LAYERS,
                "activation": activation, "output_sigmoid": True}
        write_trained(run, PRETRAIN_DIR / f"layer_{k}.pt", {"arch": arch, "seeds": stacks},
                      CURVES_DIR / f"pretrain_layer_{k}.csv", histories)
    clear_checkpoints(stage)


if __name__ == "__main__":
    run_stage("pretrain_layer", main)
