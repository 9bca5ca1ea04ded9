"""pretrain_layer K: greedy layer-wise pretraining of layer K of the deep encoder.

Layer K is a one-layer tied-weight denoising autoencoder trained on the codes of layers 1..K-1
(noisy codes in, clean codes as target), computed once from PREVIOUS, layer K-1's checkpoint. The
output checkpoint holds the whole stack 1..K for every seed, so stage K+1 depends on this file
alone. All seeds train at once, as stacked models (dae.train.fit; on a CPU one per lane, dae.lanes),
each seed in its own MLflow run.
"""
from stages.common import load_params, log, parser, resume_dir, run_stage


def main(args, name: str) -> None:
    import torch

    from dae.checkpoint import clear_resume_state, load_checkpoint, resume_state
    from dae.device import make_deterministic, select_device
    from dae.io import save_torch
    from dae.lanes import in_lanes
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, ParamError, pretrained_arch, section_flat
    from dae.report import write_curve
    from dae.splits import load_split
    from dae.tracking import dataset_inputs, stage_run
    from dae.train import FitConfig, apply_in_batches, fit, reconstruction_loss, shared
    from stages.common import tracking_root

    k = args.layer
    if not 1 <= k <= DEEP_LAYERS:
        raise ParamError(f"layer must be in 1..{DEEP_LAYERS}, got {k}")
    params, sections = load_params("pretrain_layer")
    seeds, activation = params["seeds"], params["arch"]["activation"]
    device = select_device(params["device"])
    make_deterministic(device)
    train, val = load_split(args.data, "train", device), load_split(args.data, "val", device)
    if k == 1:  # every seed reconstructs the same pixels
        below = {seed: [] for seed in seeds}
        data = {split: [shared(d[kind], len(seeds)) for kind in ("noisy", "clean")]
                for split, d in (("train", train), ("val", val))}
    else:  # layers 2..8: each seed's own codes of layers 1..k-1
        previous = load_checkpoint(args.previous, pretrained_arch(params, k - 1), seeds)
        below, stacks = {}, []
        for seed in seeds:
            stack = TiedAutoencoder.from_arch(pretrained_arch(params, k - 1))
            stack.load_state_dict(previous["seeds"][seed])
            stacks.append(stack.to(device).eval())
            below[seed] = [stack.layer(i) for i in range(k - 1)]
        # Codes are written into one [M, N, width] tensor per split and kind, and each image tensor
        # is freed once encoded: layer 2's input (55k x 384 per seed and kind) is the largest data
        # of the pipeline, so no second copy of it and no images beside all of it.
        data = {}
        for split, d in (("train", train), ("val", val)):
            data[split] = []
            for kind in ("noisy", "clean"):
                images = d.pop(kind)
                codes = torch.empty(len(seeds), images.shape[0], stacks[0].sizes[-1], device=device)
                for i, stack in enumerate(stacks):
                    codes[i] = apply_in_batches(stack.encode, images)
                data[split].append(codes)
                del images
    del train, val  # layers 2..8 train on the codes alone

    # Layer 1 reconstructs pixels (sigmoid output); deeper layers reconstruct hidden codes.
    layer_arch = pretrained_arch(params, k)
    layers = []
    for seed in seeds:
        layer = TiedAutoencoder(layer_arch["sizes"][k - 1:], layer_arch["linear_code"], activation,
                                output_sigmoid=k == 1)
        layer.reset_parameters(params["pretrain"]["init_gain"], torch.Generator().manual_seed(seed))
        layers.append(layer.to(device))
    root, in_workspace = tracking_root()
    with stage_run(name, section_flat(params, sections) | {"layer": k}, root, in_workspace,
                   dataset_inputs(params["data"], params["noise"], ["train", "val"])) as run, \
            run.member_runs() as runs:
        keys = {seed: runs.start(f"{name} seed {seed}", seed) for seed in seeds}

        def train_lane(lane: list[int]) -> list:
            """The seeds of one lane (dae.lanes), consecutive in `seeds`, as one stacked model."""
            at = slice(seeds.index(lane[0]), seeds.index(lane[-1]) + 1)
            model = TiedAutoencoder.stacked(layers[at])
            train_data, val_data = ([tensor[at] for tensor in data[split]] for split in ("train", "val"))
            lane_name = "+".join(f"seed{seed}" for seed in lane)
            checkpoint, fingerprint = resume_state(resume_dir(name), lane_name, params, model, train_data[0])
            lane_keys = [keys[seed] for seed in lane]
            results = fit(model, reconstruction_loss, train_data, val_data, FitConfig.from_section(params["pretrain"]),
                          seeds=lane, desc=lane_keys, checkpoint=checkpoint, fingerprint=fingerprint,
                          on_epoch=runs.epoch_logger(lane_keys))
            return list(zip(model.unstacked(), results))

        trained, results = zip(*in_lanes(seeds, device, train_lane))
        stacks = {seed: TiedAutoencoder.stack(below[seed] + [layer]).cpu().state_dict()
                  for seed, layer in zip(seeds, trained)}
        save_torch(args.out, {"arch": layer_arch, "seeds": stacks})
        write_curve(args.curve, [result.history for result in results])
        run.log_artifact(args.curve)
        runs.finish_trained(list(keys.values()), list(results), args.out)
    for seed, result in zip(seeds, results):
        log.info("seed %d: best val loss %.5f at epoch %d", seed, result.best_val_loss, result.best_epoch)
    clear_resume_state(resume_dir(name))


if __name__ == "__main__":
    cli = parser(__doc__, "stages.pretrain_layer")
    cli.add_argument("layer", type=int, help="K, the layer number (1..8 for arch.hidden's 7 layers and the code)")
    cli.add_argument("--data", required=True, help="folder of the noise stage's splits")
    cli.add_argument("--previous", required=True, help="layer K-1's checkpoint (unused for K = 1)")
    cli.add_argument("--out", required=True, help="the checkpoint of layers 1..K to write")
    cli.add_argument("--curve", required=True, help="the CSV of per-epoch losses to write")
    run_stage("pretrain_layer", cli, main, item=lambda args: str(args.layer))
