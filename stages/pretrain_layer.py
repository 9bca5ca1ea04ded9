"""pretrain_layer k: greedy layer-wise pretraining of layer k of the deep encoder.

Layer k is a one-layer tied-weight denoising autoencoder trained on the codes of layers
1..k-1 (noisy codes in, clean codes as target); those codes are computed once. The output
checkpoint holds the whole stack 1..k for every seed, so stage k+1 depends on this file alone.
All seeds train at once, as one stacked model (dae.train.fit), each in its own MLflow run.
"""
import argparse

from stages.common import (CURVES_DIR, PRETRAIN_DIR, clear_checkpoints, data_inputs, finish_members, fit_config,
                           load_checkpoint, load_params, load_split, log, make_deterministic, run_stage,
                           select_device, training_checkpoint, write_curve)

SECTIONS = ["arch", "pretrain", "seeds", "device"]


def main() -> None:
    import torch

    from dae.evaluate import batched
    from dae.io import save_torch
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, deep_sizes, section_flat
    from dae.tracking import stage_run
    from dae.train import fit, reconstruction_loss, shared

    parser = argparse.ArgumentParser(prog="python -m stages.pretrain_layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layer", type=int, help=f"layer number, 1..{DEEP_LAYERS}")
    k = parser.parse_args().layer
    params = load_params(SECTIONS)
    if not 1 <= k <= DEEP_LAYERS:
        raise SystemExit(f"layer must be in 1..{DEEP_LAYERS}, got {k}")
    seeds, sizes, linear_code = params["seeds"], deep_sizes(params), params["arch"]["linear_code"]
    activation = params["arch"]["activation"]
    device = select_device(params["device"])
    make_deterministic(device)
    config = fit_config(params, "pretrain")
    prev = load_checkpoint(PRETRAIN_DIR / f"layer_{k - 1}.pt", _arch(params, k - 1), seeds) if k > 1 else None

    train, val = load_split("train", device), load_split("val", device)
    if prev is None:  # layer 1: every seed reconstructs the same pixels
        below = {seed: [] for seed in seeds}
        data = {split: [shared(d[kind], len(seeds)) for kind in ("noisy", "clean")]
                for split, d in (("train", train), ("val", val))}
    else:  # layers 2..8: each seed's own codes of layers 1..k-1
        below, codes = {}, {"train": ([], []), "val": ([], [])}
        for seed in seeds:
            stack = TiedAutoencoder.from_arch(_arch(params, k - 1))
            stack.load_state_dict(prev["seeds"][seed])
            stack.to(device).eval()
            below[seed] = [stack.layer(i) for i in range(k - 1)]
            for split, d in (("train", train), ("val", val)):
                for out, kind in zip(codes[split], ("noisy", "clean")):
                    out.append(batched(stack.encode, d[kind]))
        data = {split: [torch.stack(c) for c in pair] for split, pair in codes.items()}
    del train, val  # layers 2..8 train on the codes alone

    # Layer 1 reconstructs pixels (sigmoid output); deeper layers reconstruct hidden codes.
    layers = []
    for seed in seeds:
        layer = TiedAutoencoder(sizes[k - 1:k + 1], linear_code and k == DEEP_LAYERS, activation,
                                output_sigmoid=k == 1)
        layer.reset_parameters(params["pretrain"]["init_gain"], torch.Generator().manual_seed(seed))
        layers.append(layer.to(device))
    model = TiedAutoencoder.stacked(layers)
    stage = f"pretrain_layer@{k}"
    checkpoint, fingerprint = training_checkpoint(stage, "seeds", params, model, data["train"][0])
    path, curve = PRETRAIN_DIR / f"layer_{k}.pt", CURVES_DIR / f"pretrain_layer_{k}.csv"
    with stage_run(stage, section_flat(params, SECTIONS) | {"layer": k},
                   inputs=data_inputs(["train", "val"])) as run, run.member_runs() as runs:
        keys = [runs.start(f"{stage} seed {seed}", seed) for seed in seeds]
        results = fit(model, reconstruction_loss, data["train"], data["val"], config, seeds=seeds, desc=keys,
                      checkpoint=checkpoint, fingerprint=fingerprint, on_epoch=runs.epoch_logger(keys))
        trained = dict(zip(seeds, model.unstacked()))
        arch = {"sizes": sizes[:k + 1], "linear_code": linear_code and k == DEEP_LAYERS,
                "activation": activation, "output_sigmoid": True}
        stacks = {seed: TiedAutoencoder.stack(below[seed] + [trained[seed]]).cpu().state_dict() for seed in seeds}
        save_torch(path, {"arch": arch, "seeds": stacks})
        write_curve(curve, [result.history for result in results])
        run.log_artifact(curve)
        finish_members(runs, keys, results, path)
    for seed, result in zip(seeds, results):
        log.info("seed %d: best val loss %.5f at epoch %d", seed, result.best_val_loss, result.best_epoch)
    clear_checkpoints(stage)


def _arch(params: dict, layers: int) -> dict:
    """The architecture of the pretrained stack of the first `layers` layers, as its checkpoint says."""
    from dae.params import deep_sizes

    return {"sizes": deep_sizes(params)[:layers + 1], "linear_code": False,
            "activation": params["arch"]["activation"], "output_sigmoid": True}


if __name__ == "__main__":
    run_stage("pretrain_layer", main)
