import pytest

from dae.report import SLIDE, markdown, meets, summarize, table_rows


def runs(mse):
    return [{"mse": m, "mse_noisy": m, "accuracy": 0.99, "accuracy_noisy": 0.98} for m in mse]


def test_summary_mean_and_std():
    summary = summarize({"shallow": runs([0.01, 0.03])})
    assert summary["shallow"]["mse"] == pytest.approx(0.02)
    assert summary["shallow"]["mse_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert summarize({"shallow": runs([0.01])})["shallow"]["mse_std"] == 0.0


def test_meets_direction():
    assert meets("mse", 0.006, 0.007) and not meets("mse", 0.008, 0.007)
    assert meets("accuracy", 0.983, 0.982) and not meets("accuracy", 0.95, 0.982)


def test_markdown_has_the_four_rows_and_the_slide_numbers():
    summary = summarize({m: runs([0.02, 0.02]) for m in SLIDE})
    text = markdown(summary, n_seeds=2)
    rows = [line for line in text.splitlines() if line.startswith("| 8+8") or line.startswith("| 1+1")]
    assert len(rows) == 4
    assert "0.056" in text and "98.2 %" in text and "over 2 seed(s)" in text
    greedy_ft = [r for r in table_rows(summary) if r["model"] == "greedy_ft"][0]
    assert greedy_ft["mse_meets_slide"] is False and greedy_ft["accuracy_meets_slide"] is True


def test_other_datasets_show_ours_only():
    summary = summarize({m: runs([0.02]) for m in SLIDE})
    text = markdown(summary, n_seeds=1, dataset="fashion-mnist")
    assert "Fashion-MNIST" in text and "slide has no numbers" in text
    assert "0.056" not in text and "✓" not in text
    assert len([line for line in text.splitlines() if line.startswith(("| 1+1", "| 8+8"))]) == 4
    assert "mse_slide" not in table_rows(summary, with_slide=False)[0]


def test_accuracy_shows_two_decimals_so_a_near_miss_reads_as_one():
    per_seed = {m: runs([0.02, 0.02]) for m in SLIDE}
    per_seed["greedy"] = [{"mse": 0.02, "mse_noisy": 0.02, "accuracy": a, "accuracy_noisy": a}
                          for a in (0.9711, 0.9721)]
    row = [line for line in markdown(summarize(per_seed), n_seeds=2).splitlines()
           if line.startswith("| 8+8 greedy |")][0]
    assert "97.16 ± 0.07 % ✗" in row and "97.2 %" in row


def test_the_pca_baseline_is_a_row_without_slide_cells_and_the_per_image_error_a_column():
    per_seed = {m: runs([0.02]) for m in SLIDE} | {"pca": runs([0.0177])}
    text = markdown(summarize(per_seed), n_seeds=1, code_dim=32)
    row = [line for line in text.splitlines() if line.startswith("| PCA (linear) |")][0]
    assert "✓" not in row and "✗" not in row and row.count("—") == 3
    assert "| 13.88 |" in row  # 0.0177 × 784
    assert "13.87 (PCA)" in text and "30-d" in text and "32-d" in text
    pca = [r for r in table_rows(summarize(per_seed)) if r["model"] == "pca"][0]
    assert pca["se_per_image"] == pytest.approx(0.0177 * 784) and "mse_slide" not in pca
