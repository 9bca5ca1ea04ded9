"""Benchmark: our fit loop against a plain DataLoader loop, and a full `dvc repro --force`.

    python bench/benchmark.py               # both; writes reports/benchmark.json
    python bench/benchmark.py --skip-repro  # the epoch comparison only (needs data/noisy from `dvc repro noise`)

Prints, for one fine-tuning epoch of the 8+8 model at params.yaml's batch size, the images/s of
our loop (data as tensors on the device, batches by index permutation) and of a
torch.utils.data.DataLoader over a TensorDataset with the same model, optimizer and batch size,
and their ratio (medians of interleaved epochs); then the wall time and peak RSS (largest stage
process) of `dvc repro --force`. It also prints the FLOP rate of our epoch against the device's
dense-matmul rate, and the least time the deep fine-tuning could take at that rate. With
--skip-repro the repro figures already in the output file are kept, so the quick half can be
rerun without losing the slow half.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seconds_of(work, device) -> float:
    """Wall time of `work()`, waiting for the GPU's queued kernels before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def epoch_throughput(params: dict, device, repeats: int) -> tuple[float, float, int]:
    """Images/s of our loop and of the DataLoader loop, and the number of training images."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dae.model import TiedAutoencoder
    from dae.params import model_arch
    from dae.train import FitConfig, fit, make_optimizer, reconstruction_loss
    from stages.common import load_split

    cfg = params["finetune"]
    train, val = load_split("train", device), load_split("val", device)
    n = len(train["clean"])
    tiny_val = (val["noisy"][:256], val["clean"][:256])  # keep validation out of the timing
    one_epoch = FitConfig(1, cfg["batch_size"], cfg["lr"])

    def fresh_model():
        torch.manual_seed(0)
        return TiedAutoencoder.from_arch(model_arch(params, "random_ft")).to(device)

    def our_epoch() -> None:
        fit(fresh_model(), reconstruction_loss, (train["noisy"], train["clean"]), tiny_val,
            one_epoch, seed=0, desc="ours")

    # The usual baseline: a DataLoader over CPU tensors, each batch copied to the device.
    loader = DataLoader(TensorDataset(train["noisy"].cpu(), train["clean"].cpu()),
                        batch_size=cfg["batch_size"], shuffle=True)

    def baseline_epoch() -> None:
        model = fresh_model()
        optimizer = make_optimizer(model, one_epoch)  # the same Adam as ours
        for noisy, clean in loader:
            noisy, clean = noisy.to(device), clean.to(device)
            loss = torch.mean((model(noisy) - clean) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # Warm-up (kernels, allocator), then the two loops in turn, `repeats` epochs each: one
    # epoch of each is not enough on a shared machine, where a single epoch's time can vary by
    # a third; the median of interleaved runs is.
    fit(fresh_model(), reconstruction_loss, (train["noisy"][:2048], train["clean"][:2048]), tiny_val,
        one_epoch, seed=0, desc="warm-up")
    times = {"ours": [], "baseline": []}
    for _ in range(repeats):
        times["ours"].append(seconds_of(our_epoch, device))
        times["baseline"].append(seconds_of(baseline_epoch, device))
    ours, baseline = (n / statistics.median(times[k]) for k in ("ours", "baseline"))
    return ours, baseline, n


def train_step_flops(sizes: list[int]) -> int:
    """FLOPs of one training image through a tied autoencoder: each weight matrix is used twice
    (encoder and decoder), 2 FLOPs per weight forward and about 4 backward."""
    return 12 * sum(n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def matmul_gflops(device, size: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matrix-multiply throughput of the device: what its compute allows."""
    import torch

    a = torch.rand(size, size, device=device)
    a @ a  # warm-up
    times = [seconds_of(lambda: a @ a, device) for _ in range(repeats)]
    return 2 * size ** 3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-repro", action="store_true", help="only the epoch comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each loop (median)")
    parser.add_argument("--out", default="reports/benchmark.json")
    args = parser.parse_args()

    import torch

    from dae.io import write_json
    from dae.params import deep_sizes, load
    from stages.common import select_device

    params = load("params.yaml")
    device = select_device(params["device"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {name}")
    ours, baseline, n_train = epoch_throughput(params, device, args.repeats)
    result = {"device": name, "epoch_images_per_s": round(ours, 1), "baseline_images_per_s": round(baseline, 1),
              "ratio": round(ours / baseline, 3)}
    print(f"one fine-tuning epoch, 8+8 model, batch {params['finetune']['batch_size']} "
          f"(median of {args.repeats}): "
          f"ours {ours:,.0f} images/s, DataLoader {baseline:,.0f} images/s, ratio {ours / baseline:.2f}")
    # How close the loop runs to the device's compute, and what that means for the repro time:
    # the deep fine-tuning (random_ft and greedy_ft, every seed) can be no faster than its
    # FLOPs at the dense-matmul rate.
    flops = train_step_flops(deep_sizes(params))
    peak = matmul_gflops(device)
    deep_epochs = 2 * params["finetune"]["epochs"] * len(params["seeds"])
    result |= {"epoch_gflop_per_s": round(ours * flops / 1e9, 1), "matmul_gflop_per_s": round(peak, 1),
               "deep_finetune_floor_seconds": round(deep_epochs * n_train * flops / (peak * 1e9), 1)}
    print(f"{flops / 1e6:.1f} MFLOP per training image: our epoch runs at {result['epoch_gflop_per_s']:.0f} "
          f"GFLOP/s, dense matmul at {peak:.0f} GFLOP/s; the deep fine-tuning ({deep_epochs} epochs of "
          f"{n_train:,} images) needs >= {result['deep_finetune_floor_seconds']:.0f} s at that rate")

    if not args.skip_repro:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], check=True, cwd=ROOT)
        result["repro_seconds"] = round(time.perf_counter() - start, 1)
        # ru_maxrss of children: the peak of the largest single stage process, in KiB on Linux.
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        result["seeds"] = len(params["seeds"])
        print(f"dvc repro --force ({len(params['seeds'])} seeds): {result['repro_seconds']:.0f} s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB")
    out = ROOT / args.out
    if args.skip_repro and out.exists():
        previous = json.loads(out.read_text())
        kept = {k: previous[k] for k in ("repro_seconds", "peak_rss_mb", "seeds") if k in previous}
        if kept:
            print(f"keeping the repro figures already in {out}: {kept}")
            result |= kept
    write_json(out, result)  # atomically: temp file, then rename
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
