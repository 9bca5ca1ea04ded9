"""pretrain_layer k: greedy layer-wise pretraining of layer k of the deep encoder.

Layer k is a one-layer tied-weight denoising autoencoder trained on the codes of layers
1..k-1 (noisy codes in, clean codes as target); those codes are computed once. The output
checkpoint holds the whole stack 1..k for every seed, so stage k+1 depends on this file alone.
The seeds train side by side, one process each (stages.common.train_seeds; the same results).
"""
import argparse

from stages.common import (CURVES_DIR, PRETRAIN_DIR, clear_checkpoints, data_inputs, fit_config, load_checkpoint,
                           load_params, load_split, log, make_deterministic, model_state, run_stage, seed_workers,
                           select_device, train_seeds, training_checkpoint, write_trained)

SECTIONS = ["arch", "pretrain", "seeds", "device"]


def main() -> None:
    from dae.params import DEEP_LAYERS, deep_sizes, section_flat
    from dae.tracking import stage_run

    parser = argparse.ArgumentParser(prog="python -m stages.pretrain_layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layer", type=int, help=f"layer number, 1..{DEEP_LAYERS}")
    k = parser.parse_args().layer
    params = load_params(SECTIONS)
    if not 1 <= k <= DEEP_LAYERS:
        raise SystemExit(f"layer must be in 1..{DEEP_LAYERS}, got {k}")
    sizes, linear_code = deep_sizes(params), params["arch"]["linear_code"]
    device = select_device(params["device"])
    fit_config(params, "pretrain")  # a bad section fails here, before any process starts
    seed_workers(len(params["seeds"]), device, start=True)
    prev_arch = _arch(params, k - 1)
    prev = load_checkpoint(PRETRAIN_DIR / f"layer_{k - 1}.pt", prev_arch, params["seeds"]) if k > 1 else None

    stage = f"pretrain_layer@{k}"
    with stage_run(stage, section_flat(params, SECTIONS) | {"layer": k},
                   inputs=data_inputs(["train", "val"])) as run:
        jobs = {seed: {"params": params, "layer": k, "seed": seed, "device": str(device),
                       "below": prev["seeds"][seed] if prev else None}
                for seed in params["seeds"]}
        results = train_seeds(run, stage, train_seed, jobs, device)
        arch = {"sizes": sizes[:k + 1], "linear_code": linear_code and k == DEEP_LAYERS,
                "activation": params["arch"]["activation"], "output_sigmoid": True}
        write_trained(run, PRETRAIN_DIR / f"layer_{k}.pt",
                      {"arch": arch, "seeds": {seed: model_state(arch, results[seed]["state"])
                                               for seed in params["seeds"]}},
                      CURVES_DIR / f"pretrain_layer_{k}.csv", [results[seed]["history"] for seed in params["seeds"]])
    clear_checkpoints(stage)


def _arch(params: dict, layers: int) -> dict:
    """The architecture of the pretrained stack of the first `layers` layers, as its checkpoint says."""
    from dae.params import deep_sizes

    return {"sizes": deep_sizes(params)[:layers + 1], "linear_code": False,
            "activation": params["arch"]["activation"], "output_sigmoid": True}


def train_seed(job: dict, send) -> dict:
    """Pretrain layer k of one seed's stack (in a worker process when seeds train side by side;
    see stages.common.train_seeds): {"state": the stack 1..k, "history": its epochs}."""
    import torch

    from dae.evaluate import batched
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, deep_sizes
    from dae.train import fit, reconstruction_loss

    params, k, seed = job["params"], job["layer"], job["seed"]
    device = torch.device(job["device"])
    make_deterministic(device)
    sizes, linear_code = deep_sizes(params), params["arch"]["linear_code"]
    activation = params["arch"]["activation"]
    train, val = load_split("train", device), load_split("val", device)
    torch.manual_seed(seed)
    if job["below"] is not None:
        below = TiedAutoencoder.from_arch(_arch(params, k - 1))
        below.load_state_dict(job["below"])
        below.to(device).eval()
        layers = [below.layer(i) for i in range(k - 1)]
        codes = {split: {kind: batched(below.encode, data[kind]) for kind in ("noisy", "clean")}
                 for split, data in (("train", train), ("val", val))}
    else:
        layers, codes = [], {"train": train, "val": val}
    del train, val  # layers 2..8 train on the codes alone (each worker holds its own copy of the data)
    # Layer 1 reconstructs pixels (sigmoid output); deeper layers reconstruct hidden codes.
    layer = TiedAutoencoder(sizes[k - 1:k + 1], linear_code and k == DEEP_LAYERS, activation,
                            output_sigmoid=k == 1)
    layer.reset_parameters(params["pretrain"]["init_gain"], torch.Generator().manual_seed(seed))
    layer.to(device)
    stage = f"pretrain_layer@{k}"
    checkpoint, fingerprint = training_checkpoint(stage, seed, params, layer, codes["train"]["noisy"])
    send("start", None)
    result = fit(layer, reconstruction_loss, (codes["train"]["noisy"], codes["train"]["clean"]),
                 (codes["val"]["noisy"], codes["val"]["clean"]), fit_config(params, "pretrain"), seed=seed,
                 desc=f"{stage} seed {seed}", checkpoint=checkpoint, fingerprint=fingerprint,
                 on_epoch=lambda row: send("epoch", row), progress=job["progress"])
    send("done", {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
    log.info("seed %d: best val loss %.5f at epoch %d", seed, result.best_val_loss, result.best_epoch)
    return {"state": TiedAutoencoder.stack(layers + [layer]).cpu().state_dict(), "history": result.history}


if __name__ == "__main__":
    run_stage("pretrain_layer", main)
