"""Milliseconds per fine-tuning step of the 8+8 model, for one variant of the step.

    python bench/step_probe.py eager 2 128        # today's step: eager, 2 threads, batch 128
    python bench/step_probe.py compile 2 256      # torch.compile of forward + loss, batch 256
    python bench/step_probe.py nostep 2 128       # without optimizer.step(): Adam's share
    python bench/step_probe.py eager 1 128 & python bench/step_probe.py eager 1 128; wait   # two seeds side by side

Each step is the pipeline's: a batch of real training images (needs data/noisy), fresh noise
(the noise section), bfloat16 autocast as finetune.precision says, the fused Adam of dae.train.
Prints the median of 3 × 100 steps after 20 warm-up steps. The research log
(reports/method.md, "What the remaining levers buy") has its figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/step_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=["eager", "compile", "nostep"])
    parser.add_argument("threads", type=int)
    parser.add_argument("batch", type=int)
    args = parser.parse_args()

    import torch

    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import load, model_arch
    from dae.train import autocast, make_optimizer
    from stages.common import fit_config, load_split

    torch.set_num_threads(args.threads)
    params = load(str(ROOT / "params.yaml"))
    device = torch.device("cpu")
    clean = load_split("train", device)["clean"]
    config = fit_config(params, "finetune", "greedy_ft")
    noise = params["noise"]
    torch.manual_seed(0)
    model = TiedAutoencoder.from_arch(model_arch(params, "random_ft"))
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(len(clean), generator=generator)

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.mean((model(inputs).float() - targets) ** 2)

    loss_fn = torch.compile(loss_of) if args.variant == "compile" else loss_of

    def step(i: int) -> None:
        start = (i * args.batch) % (len(clean) - args.batch)
        targets = clean[order[start:start + args.batch]]
        inputs = corrupt(targets, noise["type"], noise["level"], generator, noise["clip"])
        with autocast(device, config.precision):
            loss = loss_fn(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.variant != "nostep":
            optimizer.step()

    begin = time.perf_counter()
    for i in range(20):  # kernels, allocator and, for `compile`, the compilation
        step(i)
    warm_up = time.perf_counter() - begin
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        for i in range(100):
            step(i)
        times.append((time.perf_counter() - begin) / 100)
    ms = statistics.median(times) * 1000
    print(f"{args.variant}, {args.threads} thread(s), batch {args.batch}, {config.precision}: "
          f"{ms:.2f} ms/step, {args.batch / ms * 1000:,.0f} images/s (warm-up {warm_up:.1f} s)")


if __name__ == "__main__":
    main()
