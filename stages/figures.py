"""figures: the report's figures under reports/figures/ (declared as DVC plots).

reconstructions.png: ground truth, noisy input and each model's reconstruction of the same
test digits; pretrain_losses.png / finetune_losses.png: validation loss curves.
"""
from pathlib import Path

from stages.common import CURVES_DIR, FINETUNE_DIR, load_checkpoint, load_params, log, run_stage, select_device

SECTIONS = ["arch", "figures", "seeds", "device"]
FIGURES = Path("reports/figures")


def main() -> None:
    import pandas as pd
    import torch

    from dae import figures
    from dae.model import TiedAutoencoder
    from dae.params import DEEP_LAYERS, MODELS, model_arch, section_flat
    from dae.report import LABELS
    from dae.tracking import stage_run
    from stages.common import load_split

    params = load_params(SECTIONS)
    device = select_device(params["device"])
    seed = params["seeds"][0]  # figures show the first seed's models
    test = load_split("test", device)
    models = {}
    for name in MODELS:
        arch = model_arch(params, name)
        model = TiedAutoencoder.from_arch(arch)
        model.load_state_dict(load_checkpoint(FINETUNE_DIR / f"{name}.pt", arch, [seed])["seeds"][seed])
        models[name] = model.to(device).eval()

    with stage_run("figures", section_flat(params, SECTIONS)) as run, torch.no_grad():
        # The first test digit of each class, then the following ones: every digit appears.
        labels = test["labels"].cpu()
        n = params["figures"]["n_digits"]
        firsts = [int((labels == d).nonzero()[0]) for d in range(10) if (labels == d).any()]
        rest = [i for i in range(len(labels)) if i not in firsts]
        pick = torch.tensor((firsts + rest)[:n], device=device)
        rows = {"ground truth": test["clean"][pick], "noisy input": test["noisy"][pick]}
        rows |= {LABELS[name]: model(test["noisy"][pick]) for name, model in models.items()}
        rows = {k: v.cpu().numpy() for k, v in rows.items()}
        outputs = {"reconstructions.png": figures.image_grid(
            rows, f"Denoising test digits (seed {seed}): noisy input → reconstruction")}

        pretrain = {f"layer {k}": pd.read_csv(CURVES_DIR / f"pretrain_layer_{k}.csv")
                    for k in range(1, DEEP_LAYERS + 1)}
        outputs["pretrain_losses.png"] = figures.loss_curves(
            pretrain, "Greedy layer-wise pretraining (mean over seeds)")
        finetune = {LABELS[m]: pd.read_csv(CURVES_DIR / f"finetune_{m}.csv")
                    for m in MODELS if m != "greedy"}
        outputs["finetune_losses.png"] = figures.loss_curves(finetune, "Fine-tuning (mean over seeds)")

        for file, fig in outputs.items():
            figures.save(fig, FIGURES / file)
            run.log_artifact(FIGURES / file)
            log.info("wrote %s", FIGURES / file)


if __name__ == "__main__":
    run_stage("figures", main)
