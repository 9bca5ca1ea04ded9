"""Seconds per fine-tuning epoch of the 8+8 model under the pipeline's determinism settings,
on the device the pipeline would use (CUDA when present): what each setting costs.

    python bench/epoch_probe.py                     # the three settings below, interleaved
    python bench/epoch_probe.py --mode deterministic_nofill --epochs 3 &   # one of several
                                                    # processes sharing the device

Settings: `nondeterministic` (PyTorch's defaults); `deterministic_fill`
(torch.use_deterministic_algorithms(True) with PyTorch's default of filling every new tensor
with NaN first); `deterministic_nofill` (the same without the fill: what the stages use). The
epoch is the pipeline's fit() with params.yaml's finetune recipe on the first 55,000 real MNIST
training images (data/raw, else downloaded from $DAE_DATA_MIRROR or the public mirrors), noisy as
params.yaml's finetune.fresh_noise says. Prints each epoch's seconds and the median per setting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = ("nondeterministic", "deterministic_fill", "deterministic_nofill")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/epoch_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, help="one setting only (default: all, interleaved)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of each setting")
    args = parser.parse_args()

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as stages.common sets it
    import torch

    from dae.data import download, load_split
    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import load, model_arch
    from dae.train import fit, reconstruction_loss
    from stages.common import fit_config

    from bench.benchmark import seconds_of  # the wall time, waiting for a GPU's queue

    params = load(str(ROOT / "params.yaml"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw = ROOT / "data" / "raw"
    if not (raw / "train-images-idx3-ubyte").exists():
        download(params["data"]["dataset"], raw)
    images, _ = load_split(raw, "train")
    clean = torch.from_numpy(images[:55000].copy()).float().div_(255).to(device)
    noise = params["noise"]
    noisy = corrupt(clean, noise["type"], noise["level"], torch.Generator(device).manual_seed(0), noise["clip"])
    config = fit_config(params, "finetune", "greedy_ft")
    config.epochs = 1
    val = (noisy[:256], clean[:256])  # keep validation out of the timing
    if params["finetune"]["fresh_noise"]:  # as stages/finetune.py trains
        train = (clean,)

        def augment(batch, generator):
            return corrupt(batch[0], noise["type"], noise["level"], generator, noise["clip"]), batch[0]
    else:
        train, augment = (noisy, clean), None

    def epoch(mode: str) -> float:
        torch.use_deterministic_algorithms(mode != "nondeterministic")
        torch.utils.deterministic.fill_uninitialized_memory = mode == "deterministic_fill"
        torch.manual_seed(0)
        model = TiedAutoencoder.from_arch(model_arch(params, "random_ft")).to(device)
        return seconds_of(lambda: fit(model, reconstruction_loss, train, val, config, seed=0, desc=mode,
                                      augment=augment, progress=False), device)

    modes = [args.mode] if args.mode else list(MODES)
    epoch(modes[0])  # warm-up: kernels, allocator
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.epochs):
        for mode in modes:
            times[mode].append(epoch(mode))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    for mode, seconds in times.items():
        print(f"{name}, pid {os.getpid()}: {mode}: {statistics.median(seconds):.2f} s/epoch "
              f"({', '.join(f'{s:.2f}' for s in seconds)}), batch {config.batch_size}, {config.precision}",
              flush=True)


if __name__ == "__main__":
    main()
