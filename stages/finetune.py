"""finetune: build the slide's four models and train them end to end, into MODELS/<model>.pt.

shallow   1+1: 784 -> bottleneck, random init, trained end to end
greedy    8+8: the pretrained stack (PRETRAINED, layer 8's checkpoint), no further training
random_ft 8+8: random init, trained end to end
greedy_ft 8+8: initialised from the pretrained stack, trained end to end
The recipe (dae.finetune.finetune_stack): Glorot-uniform init, biases from the noisy images' means,
fresh noise every batch, the centred parametrisation; the best validation epoch is kept.
The models that share an architecture and an epoch count train stacked, every seed a member
(dae.train.fit): random_ft and greedy_ft together, shallow on its own; on a CPU each stack is split
into lanes trained side by side (dae.lanes). The MLflow run `finetune` has one nested run per
model and seed (`finetune greedy_ft seed 0`).
"""
from stages.common import load_params, log, parser, resume_dir, run_stage


def main(args, name: str) -> None:
    import json
    from pathlib import Path

    from dae.checkpoint import clear_resume_state, load_checkpoint
    from dae.device import make_deterministic, select_device
    from dae.io import save_torch
    from dae.lanes import in_lanes
    from dae.params import MODELS, TRAINED_MODELS, model_arch, section_flat
    from dae.finetune import evaluate_pretrained, finetune_stack
    from dae.report import write_curve
    from dae.splits import load_split
    from dae.tracking import dataset_inputs, stage_run
    from dae.train import FitConfig
    from stages.common import tracking_root

    params, sections = load_params("finetune")
    seeds = params["seeds"]
    device = select_device(params["device"])
    make_deterministic(device)
    pretrained = load_checkpoint(args.pretrained, model_arch(params, "greedy"), seeds)
    # One stack per architecture and epoch count (the rest of the recipe is shared by all).
    groups: dict[str, list[str]] = {}
    for model in TRAINED_MODELS:
        key = json.dumps([model_arch(params, model), FitConfig.from_section(params["finetune"], model).epochs])
        groups.setdefault(key, []).append(model)
    train, val = load_split(args.data, "train", device), load_split(args.data, "val", device)
    root, in_workspace = tracking_root()

    with stage_run(name, section_flat(params, sections), root, in_workspace,
                   dataset_inputs(params["data"], params["noise"], ["train", "val"])) as run, \
            run.member_runs() as runs:
        trained: dict[str, list] = {}  # model -> (run key, state_dict, FitResult) per seed
        for seed in seeds:  # greedy: the pretrained stack as it is; its losses are recorded
            key = runs.start(f"{name} greedy seed {seed}", seed, {"model": "greedy"})
            state, result = evaluate_pretrained(params, pretrained["seeds"][seed], train, val, device)
            trained.setdefault("greedy", []).append((key, state, result))
        for models in groups.values():
            members = [(model, seed) for model in models for seed in seeds]
            keys = {member: runs.start(f"{name} {member[0]} seed {member[1]}", member[1], {"model": member[0]})
                    for member in members}

            def train_lane(lane: list[tuple[str, int]]) -> list:
                lane_keys = [keys[member] for member in lane]
                return finetune_stack(params, lane, pretrained, train, val, device, desc=lane_keys,
                                      resume=resume_dir(name), on_epoch=runs.epoch_logger(lane_keys))

            for (model, _), key, (state, result) in zip(members, keys.values(), in_lanes(members, device, train_lane)):
                log.info("%s: best val loss %.5f at epoch %d", key, result.best_val_loss, result.best_epoch)
                trained.setdefault(model, []).append((key, state, result))
        for model in MODELS:
            path, curve = Path(args.models) / f"{model}.pt", Path(args.curves) / f"finetune_{model}.csv"
            keys, states, results = zip(*trained[model])
            save_torch(path, {"model": model, "arch": model_arch(params, model), "seeds": dict(zip(seeds, states))})
            write_curve(curve, [result.history for result in results])
            run.log_artifact(curve)
            runs.finish_trained(list(keys), list(results), path)
    clear_resume_state(resume_dir(name))


if __name__ == "__main__":
    cli = parser(__doc__, "stages.finetune")
    cli.add_argument("--data", required=True, help="folder of the noise stage's splits")
    cli.add_argument("--pretrained", required=True, help="the checkpoint of the 8 pretrained layers")
    cli.add_argument("--models", required=True, help="folder for <model>.pt, one file per model (all seeds)")
    cli.add_argument("--curves", required=True, help="folder for finetune_<model>.csv")
    run_stage("finetune", cli, main)
