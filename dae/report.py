"""The results table: our numbers (mean ± std over seeds) beside the slide's."""
from __future__ import annotations

import statistics
from pathlib import Path

METRICS = ("mse", "mse_noisy", "accuracy", "accuracy_noisy")
# How the report names each dataset and what one of its images is.
DATASET_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
DATASET_ITEMS = {"mnist": "digit", "fashion-mnist": "garment"}
LABELS = {"shallow": "1+1", "greedy": "8+8 greedy", "random_ft": "8+8 random + FT",
          "greedy_ft": "8+8 greedy + FT"}
# The baseline rows below the slide's models (metrics.json key `pca`).
BASELINES = {"pca": "PCA (linear)"}
ROW_LABELS = LABELS | BASELINES
PIXELS = 784
# Hinton & Salakhutdinov 2006, Fig. 2B: test squared error per image, 30-d codes, no noise.
HINTON_2006 = {"deep autoencoder": 3.00, "logistic PCA": 8.01, "PCA": 13.87}
# The published slide "Deep Denoising Autoencoder for MNIST" (accuracy as a fraction).
SLIDE = {"shallow": {"mse": 0.026, "mse_noisy": 0.025, "accuracy": 0.953},
         "greedy": {"mse": 0.056, "mse_noisy": 0.048, "accuracy": 0.972},
         "random_ft": {"mse": 0.013, "mse_noisy": 0.013, "accuracy": 0.974},
         "greedy_ft": {"mse": 0.007, "mse_noisy": 0.008, "accuracy": 0.982}}
DEFINITIONS = (
    "Definitions ({n_test} {dataset} test images, pixels in [0, 1]): MSE = mean over images of ‖x − AE(x)‖²/784; "
    "MSE noisy = the same with AE(x̃), x̃ the fixed noisy test copy; accuracy = an MLP trained on "
    "the frozen encoder codes of the clean training images, tested on the clean test codes "
    "(accuracy noisy: on the codes of x̃); SE/image = MSE × 784, the squared error per image. PCA = "
    "the linear code of the same size, fit on the clean training images. Models were selected on a "
    "{n_val}-image validation split held out of the training set; the test set was used for nothing else.")
CLASSIC = ("For scale: Hinton & Salakhutdinov (2006, Fig. 2B) report a test squared error per image of "
           + ", ".join(f"{v:.2f} ({k})" for k, v in HINTON_2006.items())
           + " on MNIST; their codes are 30-d and their inputs clean, ours {dim}-d and trained from noisy inputs.")


def summarize(per_seed: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{model: [metrics of each seed]} -> {model: {metric: mean, metric_std: std}}."""
    out = {}
    for model, runs in per_seed.items():
        row = {}
        for metric in METRICS:
            values = [r[metric] for r in runs]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[model] = row
    return out


def meets(metric: str, ours: float, slide: float) -> bool:
    return ours <= slide if metric.startswith("mse") else ours >= slide


def table_rows(summary: dict[str, dict[str, float]], with_slide: bool = True) -> list[dict]:
    rows = []
    for model, row in summary.items():
        out = {"model": model, "label": ROW_LABELS[model]}
        for metric in METRICS:
            out[metric], out[f"{metric}_std"] = row[metric], row[f"{metric}_std"]
            if with_slide and metric in SLIDE.get(model, {}):
                out[f"{metric}_slide"] = SLIDE[model][metric]
                out[f"{metric}_meets_slide"] = meets(metric, row[metric], SLIDE[model][metric])
        out["se_per_image"] = PIXELS * row["mse"]
        rows.append(out)
    return rows


def _fmt(metric: str, mean: float, std: float) -> str:
    # Two decimals: the seeds differ by about 0.1 point, and with one decimal a mean of 97.16 %
    # would read "97.2 % ✗" beside the slide's 97.2 %.
    if metric.startswith("accuracy"):
        return f"{100 * mean:.2f} ± {100 * std:.2f} %"
    return f"{mean:.4f} ± {std:.4f}"


def markdown(summary: dict[str, dict[str, float]], n_seeds: int, dataset: str = "mnist",
             n_test: int = 10000, n_val: int = 5000, code_dim: int = 32) -> str:
    """The slide's table with our numbers beside it; ✓ where ours is at least as good.

    The slide is about MNIST: for any other dataset the table shows our numbers only."""
    definitions = DEFINITIONS.format(n_test=n_test, n_val=n_val, dataset=DATASET_TITLES[dataset])
    if dataset != "mnist":
        lines = [f"# Results: deep denoising autoencoders on {DATASET_TITLES[dataset]}", "",
                 f"Mean ± std over {n_seeds} seed(s). The slide has no numbers for this dataset.", "",
                 "| model | MSE | SE/image | MSE noisy | accuracy | accuracy noisy |", "|---|---|---|---|---|---|"]
        for row in table_rows(summary, with_slide=False):
            cells = [_fmt(m, row[m], row[f"{m}_std"]) for m in METRICS]
            lines.append("| " + " | ".join([row["label"], cells[0], f"{row['se_per_image']:.2f}"] + cells[1:]) + " |")
        return "\n".join(lines + ["", definitions, ""])
    lines = [f"# Results: deep denoising autoencoders on {DATASET_TITLES[dataset]}", "",
             f"Ours: mean ± std over {n_seeds} seed(s). Slide: the published table. "
             "✓ = ours at least as good as the slide (MSE lower or equal, accuracy higher or equal).", "",
             "| model | MSE (ours) | MSE (slide) | SE/image (ours) | MSE noisy (ours) | MSE noisy (slide) "
             "| accuracy (ours) | accuracy (slide) | accuracy noisy (ours) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table_rows(summary):
        cells = [row["label"]]
        for metric in ("mse", "mse_noisy", "accuracy"):
            ours = _fmt(metric, row[metric], row[f"{metric}_std"])
            if f"{metric}_slide" in row:  # a slide model; the baselines have no slide cell
                slide = row[f"{metric}_slide"]
                cells += [ours + (" ✓" if row[f"{metric}_meets_slide"] else " ✗"),
                          f"{100 * slide:.1f} %" if metric == "accuracy" else f"{slide:.3f}"]
            else:
                cells += [ours, "—"]
            if metric == "mse":
                cells.append(f"{row['se_per_image']:.2f}")
        cells.append(_fmt("accuracy", row["accuracy_noisy"], row["accuracy_noisy_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", definitions, "", CLASSIC.format(dim=code_dim), ""]
    return "\n".join(lines)


def write_curve(path: str | Path, histories: list[list[dict]]) -> None:
    """Per-epoch losses averaged over seeds ({epoch, train_loss, val_loss} rows), as CSV for `dvc plots`."""
    import pandas as pd

    from dae.io import write_with

    frame = pd.concat([pd.DataFrame(h) for h in histories]).groupby("epoch", as_index=False).mean()
    write_with(path, lambda tmp: frame[["epoch", "train_loss", "val_loss"]].to_csv(tmp, index=False))


# The report page's figures (reports/figures/<file>) in order, with their captions.
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
# What the MNIST figure shows (checked by eye on the full-scale run; not true of every dataset).
CAPTION_NOTES = {("mnist", "manifold.png"): " One step already turns every start into a smooth, stroke-like "
                 "image; further steps drift along the manifold (towards digit-like shapes, not back to the "
                 "original digit)."}


def index_page(dataset: str, results_md: str, code_dim: int, figures_dir: str = "figures") -> str:
    """reports/index.md: the results table (`results_md` without its title) and every figure with
    its caption, titled after the dataset."""
    item = DATASET_ITEMS[dataset]
    table = results_md.split("\n", 1)[1]
    page = [f"# Deep denoising autoencoders on {DATASET_TITLES[dataset]} — the reproduction", "",
            "Everything below is produced by `dvc repro` (see the [README](../README.md)). The method (the "
            "recipe, why each choice, what was rejected) is in [method.md](method.md); the full-scale studies "
            "(noise level, noise type, Fashion-MNIST) are in [studies.md](studies.md).", "",
            "## Results", table, "## Figures", ""]
    for file, caption in CAPTIONS.items():
        caption = caption.format(item=item, dim=code_dim) + CAPTION_NOTES.get((dataset, file), "")
        page += [f"### {file.removesuffix('.png').replace('_', ' ').capitalize()}", "", caption, "",
                 f"![{file}]({figures_dir}/{file})", ""]
    return "\n".join(page)
