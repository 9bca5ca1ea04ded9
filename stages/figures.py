"""figures: the report's figures in FIGURES (DVC plots) and the page PAGE (reports/index.md).

reconstructions.png  ground truth, noisy input and each model's reconstruction of the same test images
latent_space.png     test codes of every model in 2-D (PCA and t-SNE; raw codes for a 2-D bottleneck)
manifold.png         the denoiser iterated from noise and from heavily corrupted images; the decoded code plane
morphing.png         interpolation between test images in code space versus pixel space
pretrain_losses.png, finetune_losses.png   validation loss curves
The first seed's models are shown. The page holds the results table and every figure with its
caption (dae.report.index_page), titled after data.dataset.
"""
from stages.common import load_params, log, parser, run_stage

MANIFOLD_STEPS = [0, 1, 2, 5, 10, 50]
ALPHAS = [i / 10 for i in range(11)]


def main(args, name: str) -> None:
    from pathlib import Path

    import pandas as pd
    import torch

    from dae import analysis, figures
    from dae.checkpoint import load_checkpoint
    from dae.device import select_device
    from dae.io import write_text
    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import DEEP_LAYERS, MODELS, model_arch, section_flat
    from dae.report import DATASET_ITEMS, LABELS, index_page
    from dae.splits import load_split
    from dae.tracking import dataset_inputs, stage_run
    from stages.common import tracking_root

    params, sections = load_params("figures")
    device = select_device(params["device"])
    seed, bottleneck, dataset = params["seeds"][0], params["arch"]["bottleneck"], params["data"]["dataset"]
    torch.manual_seed(seed)
    test = load_split(args.data, "test", device)
    models = {}
    for model_name in MODELS:
        arch = model_arch(params, model_name)
        model = TiedAutoencoder.from_arch(arch)
        model.load_state_dict(load_checkpoint(Path(args.models) / f"{model_name}.pt", arch, [seed])["seeds"][seed])
        models[model_name] = model.to(device).eval()
    best, labels, item = models["greedy_ft"], test["labels"].cpu().numpy(), DATASET_ITEMS[dataset]
    outputs = {}
    root, in_workspace = tracking_root()
    with stage_run(name, section_flat(params, sections), root, in_workspace,
                   dataset_inputs(params["data"], params["noise"], ["test"])) as run, torch.no_grad():
        # Reconstructions: the first test image of each class, then the next ones.
        shown, firsts = analysis.example_indices(labels, params["figures"]["n_digits"])
        pick = torch.tensor(shown, device=device)
        rows = {"ground truth": test["clean"][pick], "noisy input": test["noisy"][pick]}
        rows |= {LABELS[model_name]: model(test["noisy"][pick]) for model_name, model in models.items()}
        outputs["reconstructions.png"] = figures.image_grid(
            {k: v.cpu().numpy() for k, v in rows.items()},
            f"Denoising test {item}s (seed {seed}): noisy input → reconstruction")

        # Latent space: a fixed random subset of the test set.
        subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        subset = subset[:params["figures"]["tsne_points"]].numpy()
        panels = {}
        for model_name, model in models.items():
            codes = model.encode(test["clean"][torch.as_tensor(subset, device=device)])
            panels[LABELS[model_name]] = ({"raw 2-d codes": codes.cpu().numpy()} if bottleneck == 2 else
                                          {"PCA": analysis.pca(codes)[0].cpu().numpy(),
                                           "t-SNE": analysis.tsne(codes.cpu().numpy(), seed)})
            log.info("latent space of %s embedded", model_name)
        outputs["latent_space.png"] = figures.latent_panels(
            panels, labels[subset], f"Test codes ({bottleneck}-d bottleneck, {len(subset)} {item}s), coloured by class")

        # Manifold: start from pure noise and from heavily corrupted test images.
        g = torch.Generator().manual_seed(seed)
        starts = {f"noise {i + 1}": torch.rand(784, generator=g) for i in range(3)}
        corrupted = corrupt(test["clean"][pick[:3]].cpu(), "gaussian", 0.8, g).clamp(0, 1)
        starts |= {f"{item} + σ=0.8 noise {i + 1}": corrupted[i] for i in range(3)}
        trajectory = analysis.iterate_denoiser(best, torch.stack(list(starts.values())).to(device), MANIFOLD_STEPS)
        trajectories = {start: {s: trajectory[s][i].cpu().numpy() for s in MANIFOLD_STEPS}
                        for i, start in enumerate(starts)}
        plane = analysis.decoded_plane(best, best.encode(test["clean"]), raw=bottleneck == 2)
        plane_title = ("decoded code plane (2-d bottleneck)" if bottleneck == 2 else
                       "decoded along the 2 leading principal directions of the codes (±2 std)")
        outputs["manifold.png"] = figures.manifold(trajectories, plane, plane_title,
                                                   f"Manifold learning ({LABELS['greedy_ft']}, seed {seed})")

        # Morphing: pairs of test images of different classes.
        pairs = [(firsts[a], firsts[b]) for a, b in ((1, 7), (3, 8), (4, 9), (0, 6)) if max(a, b) < len(firsts)]
        morph_rows = {}
        for i, j in pairs:
            x1, x2 = test["clean"][i], test["clean"][j]
            morph_rows[f"{labels[i]} → {labels[j]}\ncode space"] = analysis.morph(best, x1, x2, ALPHAS).cpu().numpy()
            morph_rows[f"{labels[i]} → {labels[j]}\npixel space"] = analysis.blend_pixels(x1, x2, ALPHAS).cpu().numpy()
        outputs["morphing.png"] = figures.image_grid(
            morph_rows, f"{item.capitalize()} morphing ({LABELS['greedy_ft']}): decode((1−α)·z₁ + α·z₂) vs (1−α)·x₁ + α·x₂",
            col_labels=[f"α={a:.1f}" for a in ALPHAS])

        curves = Path(args.curves)
        pretrain = {f"layer {k}": pd.read_csv(curves / f"pretrain_layer_{k}.csv") for k in range(1, DEEP_LAYERS + 1)}
        outputs["pretrain_losses.png"] = figures.loss_curves(pretrain, "Greedy layer-wise pretraining (mean over seeds)")
        finetune = {LABELS[m]: pd.read_csv(curves / f"finetune_{m}.csv") for m in MODELS if m != "greedy"}
        outputs["finetune_losses.png"] = figures.loss_curves(finetune, "Fine-tuning (mean over seeds)")

        for file, fig in outputs.items():
            figures.save(fig, Path(args.figures) / file)
            run.log_artifact(Path(args.figures) / file)
            log.info("wrote %s", Path(args.figures) / file)
        figures_dir = Path(args.figures).resolve().relative_to(Path(args.page).resolve().parent)
        write_text(args.page, index_page(dataset, Path(args.results).read_text(), bottleneck, figures_dir.as_posix()))
        run.log_artifact(args.page)


if __name__ == "__main__":
    cli = parser(__doc__, "stages.figures")
    cli.add_argument("--data", required=True, help="folder of the noise stage's splits")
    cli.add_argument("--models", required=True, help="folder of finetune's <model>.pt")
    cli.add_argument("--curves", required=True, help="folder of the training stages' loss curves")
    cli.add_argument("--results", required=True, help="evaluate's Markdown table")
    cli.add_argument("--figures", required=True, help="folder for the figures")
    cli.add_argument("--page", required=True, help="the report page to write")
    run_stage("figures", cli, main)
