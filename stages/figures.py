"""figures: the report's figures under reports/figures/ (DVC plots) and the page reports/index.md.

reconstructions.png  ground truth, noisy input and each model's reconstruction of the same test images
latent_space.png     test codes of every model in 2-D (PCA and t-SNE; raw codes for a 2-D bottleneck)
manifold.png         the denoiser iterated from noise and from heavily corrupted images; the decoded code plane
morphing.png         interpolation between test images in code space versus pixel space
pretrain_losses.png, finetune_losses.png   validation loss curves
The first seed's models are shown. Also writes reports/index.md: the results table and every
figure with its caption, titled after data.dataset.
"""
from pathlib import Path

from stages.common import (CURVES_DIR, FINETUNE_DIR, data_inputs, load_checkpoint, load_params, log, run_stage,
                           select_device)

SECTIONS = ["arch", "figures", "seeds", "device", "data"]
FIGURES = Path("reports/figures")
MANIFOLD_STEPS = [0, 1, 2, 5, 10, 50]
ALPHAS = [i / 10 for i in range(11)]
# {item}: "digit" on MNIST, "garment" on Fashion-MNIST; {dim}: the bottleneck size.
CAPTIONS = {
    "reconstructions.png": "Test {item}s (top), their noisy copies (second row) and each model's reconstruction "
                           "from the noisy copy.",
    "latent_space.png": "The {dim}-d test codes of each model projected to 2-D by PCA and t-SNE, coloured by class.",
    "manifold.png": "The denoiser as a projection onto the {item} manifold: pure noise and heavily corrupted {item}s "
                    "(σ = 0.8) fed through the 8+8 greedy + FT model again and again. Right: {item}s decoded along "
                    "the code space's two leading principal directions.",
    "morphing.png": "Morphing between test {item}s: decoding interpolated codes (code space) stays on the {item} "
                    "manifold, while the pixel-space cross-fade only superimposes the two images.",
    "pretrain_losses.png": "Validation loss of each greedily pretrained layer (reconstructing its input codes).",
    "finetune_losses.png": "Validation MSE of the models trained end to end.",
}
# What the MNIST figure shows (checked by eye on the committed run; not true of every dataset).
CAPTION_NOTES = {("mnist", "manifold.png"): " One step already turns every start into a smooth, stroke-like "
                 "image; further steps drift along the manifold (towards digit-like shapes, not back to the "
                 "original digit)."}


def main() -> None:
    import numpy as np
    import pandas as pd
    import torch

    from dae import experiments, figures
    from dae.io import write_text
    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import DEEP_LAYERS, MODELS, model_arch, section_flat
    from dae.report import DATASET_ITEMS, DATASET_TITLES, LABELS
    from dae.tracking import stage_run
    from stages.common import load_split

    params = load_params(SECTIONS)
    device = select_device(params["device"])
    seed = params["seeds"][0]
    torch.manual_seed(seed)
    test = load_split("test", device)
    models = {}
    for name in MODELS:
        arch = model_arch(params, name)
        model = TiedAutoencoder.from_arch(arch)
        model.load_state_dict(load_checkpoint(FINETUNE_DIR / f"{name}.pt", arch, [seed])["seeds"][seed])
        models[name] = model.to(device).eval()
    best = models["greedy_ft"]
    bottleneck = params["arch"]["bottleneck"]
    labels = test["labels"].cpu().numpy()
    dataset = params["data"]["dataset"]
    item = DATASET_ITEMS[dataset]
    outputs = {}

    with stage_run("figures", section_flat(params, SECTIONS), inputs=data_inputs(["test"])) as run, \
            torch.no_grad():
        # Reconstructions: the first test digit of each class, then the next ones.
        n = params["figures"]["n_digits"]
        firsts = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()]
        first_set = set(firsts)
        rest = [i for i in range(len(labels)) if i not in first_set]
        pick = torch.tensor((firsts + rest)[:n], device=device)
        rows = {"ground truth": test["clean"][pick], "noisy input": test["noisy"][pick]}
        rows |= {LABELS[name]: model(test["noisy"][pick]) for name, model in models.items()}
        outputs["reconstructions.png"] = figures.image_grid(
            {k: v.cpu().numpy() for k, v in rows.items()},
            f"Denoising test {item}s (seed {seed}): noisy input → reconstruction")

        # Latent space: a fixed random subset of the test set.
        subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        subset = subset[:params["figures"]["tsne_points"]].numpy()
        panels = {}
        for name, model in models.items():
            codes = model.encode(test["clean"][torch.as_tensor(subset, device=device)])
            if bottleneck == 2:
                panels[LABELS[name]] = {"raw 2-d codes": codes.cpu().numpy()}
            else:
                panels[LABELS[name]] = {"PCA": experiments.pca(codes)[0].cpu().numpy(),
                                        "t-SNE": experiments.tsne(codes.cpu().numpy(), seed)}
            log.info("latent space of %s embedded", name)
        outputs["latent_space.png"] = figures.latent_panels(
            panels, labels[subset], f"Test codes ({bottleneck}-d bottleneck, {len(subset)} {item}s), coloured by class")

        # Manifold: start from pure noise and from heavily corrupted test digits.
        g = torch.Generator().manual_seed(seed)
        starts = {f"noise {i + 1}": torch.rand(784, generator=g) for i in range(3)}
        corrupted = corrupt(test["clean"][pick[:3]].cpu(), "gaussian", 0.8, g).clamp(0, 1)
        starts |= {f"{item} + σ=0.8 noise {i + 1}": corrupted[i] for i in range(3)}
        batch = torch.stack(list(starts.values())).to(device)
        trajectory = experiments.iterate_denoiser(best, batch, MANIFOLD_STEPS)
        trajectories = {name: {s: trajectory[s][i].cpu().numpy() for s in MANIFOLD_STEPS}
                        for i, name in enumerate(starts)}
        all_codes = best.encode(test["clean"])
        plane = experiments.decoded_plane(best, all_codes, raw=bottleneck == 2)
        plane_title = ("decoded code plane (2-d bottleneck)" if bottleneck == 2 else
                       "decoded along the 2 leading principal directions of the codes (±2 std)")
        outputs["manifold.png"] = figures.manifold(trajectories, plane, plane_title,
                                                   f"Manifold learning ({LABELS['greedy_ft']}, seed {seed})")

        # Morphing: pairs of test digits of different classes.
        pairs = [(firsts[a], firsts[b]) for a, b in ((1, 7), (3, 8), (4, 9), (0, 6)) if max(a, b) < len(firsts)]
        morph_rows = {}
        for i, j in pairs:
            x1, x2 = test["clean"][i], test["clean"][j]
            pair = f"{labels[i]} → {labels[j]}"
            morph_rows[f"{pair}\ncode space"] = experiments.morph(best, x1, x2, ALPHAS).cpu().numpy()
            morph_rows[f"{pair}\npixel space"] = experiments.blend_pixels(x1, x2, ALPHAS).cpu().numpy()
        outputs["morphing.png"] = figures.image_grid(
            morph_rows, f"{item.capitalize()} morphing ({LABELS['greedy_ft']}): decode((1−α)·z₁ + α·z₂) vs (1−α)·x₁ + α·x₂",
            col_labels=[f"α={a:.1f}" for a in ALPHAS])

        pretrain = {f"layer {k}": pd.read_csv(CURVES_DIR / f"pretrain_layer_{k}.csv")
                    for k in range(1, DEEP_LAYERS + 1)}
        outputs["pretrain_losses.png"] = figures.loss_curves(pretrain, "Greedy layer-wise pretraining (mean over seeds)")
        finetune = {LABELS[m]: pd.read_csv(CURVES_DIR / f"finetune_{m}.csv") for m in MODELS if m != "greedy"}
        outputs["finetune_losses.png"] = figures.loss_curves(finetune, "Fine-tuning (mean over seeds)")

        for file, fig in outputs.items():
            figures.save(fig, FIGURES / file)
            run.log_artifact(FIGURES / file)
            log.info("wrote %s", FIGURES / file)

        table = Path("reports/results.md").read_text().split("\n", 1)[1]  # drop its title
        page = [f"# Deep denoising autoencoders on {DATASET_TITLES[dataset]} — the reproduction", "",
                "Everything below is produced by `dvc repro` (see the [README](../README.md)); how the "
                "recipe was chosen, and what was tried, is in the [research log](method.md).", "",
                "## Results", table, "## Figures", ""]
        for file, caption in CAPTIONS.items():
            caption = caption.format(item=item, dim=bottleneck) + CAPTION_NOTES.get((dataset, file), "")
            page += [f"### {file.removesuffix('.png').replace('_', ' ').capitalize()}", "", caption, "",
                     f"![{file}](figures/{file})", ""]
        write_text(Path("reports/index.md"), "\n".join(page))
        run.log_artifact(Path("reports/index.md"))


if __name__ == "__main__":
    run_stage("figures", main)
