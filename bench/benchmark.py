"""Benchmark: the time to the slide, and what bounds it.

    python bench/benchmark.py                          # everything; writes reports/benchmark.json
    python bench/benchmark.py --previous ebab905       # also times that commit's 3-seed repro, for the speed-up
    python bench/benchmark.py --skip-repro             # the epoch, scaling and matmul figures only (needs data/noisy)

1. The device: its dense float32 and bfloat16 matrix-multiply rates (what its compute allows).
2. One fine-tuning epoch of the 8+8 model at params.yaml's batch size and precision: images/s of
   our loop (data as tensors on the device, batches by index permutation) against a
   torch.utils.data.DataLoader over a TensorDataset with the same model, optimizer, batch size
   and precision (medians of interleaved epochs), the epoch's GFLOP/s and its fraction of the
   matmul rate.
3. The scaling curve: images/s in all and per member of M = 1, 3, 6, 12, 24, 48 stacked 8+8
   members (dae.train's training step, fresh noise, params.yaml's batch size and precision; on
   CUDA one graph replay a step, as fit runs it). On a CPU also the finetune stage's stack as one
   stack against the same members in one-thread lanes side by side (dae.lanes), as the stage runs it.
4. Stage start-up: the seconds a fresh stage process spends importing torch, MLflow and dae, and
   initialising CUDA. On CUDA also the GPU's busy fraction (kernel time / wall time, torch.profiler)
   of stacked fine-tuning steps, for one member and for the finetune stage's stack.
5. With --previous REV: `dvc repro --force` of that commit in a fresh `git worktree`, then
6. `dvc repro --force` of this workspace (its outputs are the committed results): wall time,
   seconds per stage and peak RSS (the largest process, and all processes together, also per stage);
   `speedup_vs_previous` is the ratio of the two, measured one right after the other.

Timings on a shared machine vary by up to a third from run to run: the ratios, each measured
within one run of this script, are the figures to compare; the matmul rates say how fast the
machine was at the time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

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
    from dae.train import FitConfig, autocast, fit, make_optimizer, reconstruction_loss, shared
    from dae.splits import load_split

    train, val = load_split("data/noisy", "train", device), load_split("data/noisy", "val", device)
    n = len(train["clean"])
    tiny_val = (shared(val["noisy"][:256], 1), shared(val["clean"][:256], 1))  # keep validation out of the timing
    one_epoch = FitConfig.from_section(params["finetune"], "greedy_ft")
    one_epoch.epochs = 1

    def fresh_model():
        torch.manual_seed(0)
        return TiedAutoencoder.from_arch(model_arch(params, "random_ft")).to(device)

    def our_epoch() -> None:
        fit(TiedAutoencoder.stacked([fresh_model()]), reconstruction_loss,
            (shared(train["noisy"], 1), shared(train["clean"], 1)), tiny_val, one_epoch, seeds=[0], desc=["ours"],
            progress=False)

    # The usual baseline: a DataLoader over CPU tensors, each batch copied to the device.
    loader = DataLoader(TensorDataset(train["noisy"].cpu(), train["clean"].cpu()),
                        batch_size=one_epoch.batch_size, shuffle=True)

    def baseline_epoch() -> None:
        model = fresh_model()
        optimizer = make_optimizer(model, one_epoch)  # the same Adam as ours
        for noisy, clean in loader:
            noisy, clean = noisy.to(device), clean.to(device)
            with autocast(device, one_epoch.precision):  # the same precision as ours
                loss = torch.mean((model(noisy).float() - clean) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    # Warm-up (kernels, allocator), then the two loops in turn, `repeats` epochs each: one
    # epoch of each is not enough on a shared machine, where a single epoch's time can vary by
    # a third; the median of interleaved runs is.
    fit(TiedAutoencoder.stacked([fresh_model()]), reconstruction_loss,
        (shared(train["noisy"][:2048], 1), shared(train["clean"][:2048], 1)), tiny_val, one_epoch, seeds=[0],
        desc=["warm-up"], progress=False)
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


def stacked_step(params: dict, device, members: int, images=None):
    """One stacked fine-tuning step of `members` 8+8 members, as fit runs it (dae.train's step,
    fresh noise, params.yaml's batch size and precision; on CUDA one graph replay), on fixed rows."""
    import torch

    from dae.model import TiedAutoencoder
    from dae.noise import corrupt
    from dae.params import model_arch
    from dae.train import FitConfig, GraphedStep, make_optimizer, reconstruction_loss, shared, training_step

    config = FitConfig.from_section(params["finetune"], "random_ft")
    noise = params["noise"]
    images = torch.rand(4096, 784, device=device) if images is None else images  # the cost does not depend on pixels

    def augment(batch, generators):
        return torch.stack([corrupt(batch[0][i], noise["type"], noise["level"], g)
                            for i, g in enumerate(generators)]), batch[0]

    models = []
    for seed in range(members):
        model = TiedAutoencoder.from_arch(model_arch(params, "random_ft"))
        model.reset_parameters(params["finetune"]["init_gain"], torch.Generator().manual_seed(seed))
        models.append(model.to(device))
    stack = TiedAutoencoder.stacked(models)
    graphed = device.type == "cuda"
    optimizer = make_optimizer(stack, config, capturable=graphed)
    generators = [torch.Generator(device).manual_seed(seed) for seed in range(members)]
    step = training_step(stack, reconstruction_loss, optimizer, (shared(images, members),),
                         config.precision, augment, generators)
    if graphed:  # as fit runs it on CUDA: one graph replay a step
        step = GraphedStep(step, (members, config.batch_size), device, generators)
    idx = torch.randint(0, len(images), (members, config.batch_size), device=device)
    return lambda: step(idx)


def scaling_curve(params: dict, device, sizes=(1, 3, 6, 12, 24, 48), steps: int = 10) -> list[dict]:
    """Images/s of M stacked 8+8 members, in all and per member: the median of `steps` stacked
    fine-tuning steps (stacked_step) after 3 warm-up steps."""
    import torch

    batch = params["finetune"]["batch_size"]
    images = torch.rand(4096, 784, device=device)
    curve = []
    for members in sizes:
        step = stacked_step(params, device, members, images)
        for _ in range(3):
            step()
        seconds = statistics.median(seconds_of(step, device) for _ in range(steps))
        total = members * batch / seconds
        curve.append({"members": members, "images_per_s": round(total, 1),
                      "images_per_s_per_member": round(total / members, 1), "step_ms": round(seconds * 1e3, 2)})
        print(f"{members:3d} stacked members: {total:9,.0f} images/s in all, {total / members:8,.0f} per member "
              f"({seconds * 1e3:.1f} ms a step)", flush=True)
        del step
    return curve


def lanes_figure(params: dict, device, steps: int = 20) -> dict:
    """CPU: images/s of the finetune stage's stack (random_ft and greedy_ft, every seed) as one
    stack on all threads, against the same members in dae.lanes' one-thread lanes side by side,
    run by dae.lanes.in_lanes as the stage runs them."""
    import torch

    from dae.lanes import in_lanes, lane_count, split

    members = 2 * len(params["seeds"])
    batch = params["finetune"]["batch_size"]
    images = torch.rand(4096, 784, device=device)
    stack = stacked_step(params, device, members, images)
    for _ in range(3):
        stack()
    one_stack = members * batch * steps / seconds_of(lambda: [stack() for _ in range(steps)], device)
    lanes = split(range(members), lane_count(members, device))
    lane_steps = {lane[0]: stacked_step(params, device, len(lane), images) for lane in lanes}
    for step in lane_steps.values():  # warm-up
        step()

    def train(lane: list[int]) -> list[int]:
        for _ in range(steps):
            lane_steps[lane[0]]()
        return lane

    start = time.perf_counter()
    in_lanes(list(range(members)), device, train)
    in_lanes_rate = members * batch * steps / (time.perf_counter() - start)
    sizes = [len(lane) for lane in lanes]
    print(f"{members} members as one stack: {one_stack:,.0f} images/s; in {len(lanes)} one-thread lanes of "
          f"{sizes}: {in_lanes_rate:,.0f} images/s ({in_lanes_rate / one_stack:.2f}x)", flush=True)
    return {"members": members, "lanes": sizes, "one_stack_images_per_s": round(one_stack, 1),
            "lanes_images_per_s": round(in_lanes_rate, 1), "ratio": round(in_lanes_rate / one_stack, 3)}


# What a training stage loads before it trains, in order: each step's seconds are its share of
# the start-up (the later imports reuse what the earlier ones loaded).
STARTUP_STEPS = {
    "torch": "import torch",
    "mlflow": "import mlflow; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore",
    "dae": "import dae.train, dae.model, dae.evaluate, dae.tracking, dae.device, stages.common",
    "cuda_init": "torch.cuda.is_available() and torch.cuda.init()",
}


def startup_seconds(repeats: int = 3, steps: dict[str, str] = STARTUP_STEPS) -> dict:
    """Median seconds of a fresh interpreter's start-up `steps` and in all: the floor of every
    stage's start-up. `cuda_init` is ~0 on a machine without a GPU."""
    code = ("import time, json; t = {}; s = time.perf_counter()\n"
            + "".join(f"{step}; t[{name!r}] = time.perf_counter() - s; s = time.perf_counter()\n"
                      for name, step in steps.items())
            + "print(json.dumps(t))")
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout) | {"total": time.perf_counter() - start})
    return {name: round(statistics.median(run[name] for run in runs), 2) for name in [*steps, "total"]}


def gpu_busy_fractions(params: dict, device) -> dict[str, float]:
    """gpu_busy_fraction for one member and for the finetune stage's stack (random_ft and
    greedy_ft, every seed), keyed by the member count."""
    stage_members = 2 * len(params["seeds"])
    return {str(m): round(gpu_busy_fraction(params, device, m), 3) for m in sorted({1, stage_members})}


def gpu_busy_fraction(params: dict, device, members: int, steps: int = 20) -> float:
    """CUDA only: the GPU's kernel time over the wall time of `steps` stacked fine-tuning steps of
    `members` members (torch.profiler), as fit runs them (a CUDA graph replay each)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step = stacked_step(params, device, members)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = seconds_of(lambda: [step() for _ in range(steps)], device)
    # With only the CUDA activity recorded, every event is device work (kernels, copies, fills).
    kernel_us = sum(event.self_device_time_total for event in prof.key_averages())
    return kernel_us / 1e6 / wall


def matmul_gflops(device, dtype_name: str = "float32", size: int | None = None, repeats: int = 10) -> float:
    """Dense matrix-multiply throughput of the device in `dtype_name`: what its compute allows.
    Default size: 2048 on a CPU; 8192 on a GPU, where a 2048 product is too short to time."""
    import torch

    size = size or (8192 if device.type == "cuda" else 2048)

    a = torch.rand(size, size, device=device).to(getattr(torch, dtype_name))
    a @ a  # warm-up
    times = [seconds_of(lambda: a @ a, device) for _ in range(repeats)]
    return 2 * size ** 3 / statistics.median(times) / 1e9


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of process `root_pid` and all its descendants together, in MB (Linux /proc)."""
    parents, rss = {}, {}
    page_kb = os.sysconf("SC_PAGE_SIZE") / 1024
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                parents[int(entry.name)] = int(fields[1])
                rss[int(entry.name)] = int((entry / "statm").read_text().split()[1]) * page_kb
            except (OSError, ValueError, IndexError):  # the process just ended
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(pid, 0.0) for pid in tree) / 1024


def timed_repro(cwd: Path, label: str) -> dict:
    """`dvc repro --force` in `cwd`, its output passed through; wall seconds, seconds per stage
    (from one "Running stage" line to the next) and the peak resident memory of all its
    processes together, sampled every half second."""
    import threading

    print(f"--- {label}: dvc repro --force in {cwd}", flush=True)
    starts: list[tuple[str, float]] = []
    start = time.perf_counter()
    # The stages' `python` is this interpreter's, as in an activated venv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    peak = {"mb": 0.0}
    stage_peak: dict[str, float] = {}
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force"], cwd=cwd, text=True, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        def sample() -> None:
            while proc.poll() is None:
                mb = tree_rss_mb(proc.pid)
                peak["mb"] = max(peak["mb"], mb)
                if starts:
                    stage_peak[starts[-1][0]] = max(stage_peak.get(starts[-1][0], 0.0), round(mb, 1))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            found = re.match(r"Running stage '([^']+)'", line)
            if found:
                starts.append((found.group(1), time.perf_counter()))
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{label}: dvc repro failed (exit {proc.returncode})")
    end = time.perf_counter()
    ends = [t for _, t in starts[1:]] + [end]
    stages = {name: round(stop - begin, 1) for (name, begin), stop in zip(starts, ends)}
    print(f"--- {label}: {end - start:.0f} s, peak memory of all its processes {peak['mb']:.0f} MB", flush=True)
    return {"seconds": round(end - start, 1), "stage_seconds": stages, "peak_rss_total_mb": round(peak["mb"], 1),
            "stage_peak_rss_total_mb": stage_peak}


def previous_repro(rev: str) -> dict:
    """`dvc repro --force` of commit `rev`, as committed, in a fresh git worktree."""
    work = Path(tempfile.mkdtemp(prefix="dae-bench-"))
    tree = work / "repo"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
    try:
        result = timed_repro(tree, f"previous ({rev})")
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                                          capture_output=True, text=True).stdout.strip()
        return result
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)


def epoch_figures(params: dict, device, repeats: int, rates: dict) -> dict:
    """Section 2 of the docstring: our epoch against the DataLoader's, and its FLOP rate."""
    from dae.params import deep_sizes
    from dae.train import FitConfig

    finetune = FitConfig.from_section(params["finetune"], "greedy_ft")
    ours, baseline, n_train = epoch_throughput(params, device, repeats)
    flops = train_step_flops(deep_sizes(params))
    epoch_gflops = ours * flops / 1e9
    peak = rates[finetune.precision]
    result = {"batch_size": finetune.batch_size, "precision": finetune.precision,
              "epoch_images_per_s": round(ours, 1), "baseline_images_per_s": round(baseline, 1),
              "ratio": round(ours / baseline, 3), "epoch_gflop_per_s": round(epoch_gflops, 1),
              "epoch_fraction_of_matmul": round(epoch_gflops / peak, 5)}
    # The least time the deep fine-tuning (random_ft and greedy_ft, every seed) could take if it
    # ran at the device's matmul rate in its precision.
    deep_epochs = len(params["seeds"]) * sum(FitConfig.from_section(params["finetune"], m).epochs
                                             for m in ("random_ft", "greedy_ft"))
    result["deep_finetune_floor_seconds"] = round(deep_epochs * n_train * flops / (peak * 1e9), 1)
    print(f"one fine-tuning epoch, 8+8 model, batch {finetune.batch_size}, {finetune.precision} "
          f"(median of {repeats}): ours {ours:,.0f} images/s, DataLoader {baseline:,.0f} images/s, "
          f"ratio {ours / baseline:.2f}; {flops / 1e6:.1f} MFLOP per training image, so "
          f"{epoch_gflops:.0f} GFLOP/s = {epoch_gflops / peak:.0%} of the {finetune.precision} matmul rate")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-repro", action="store_true", help="only the epoch, scaling and matmul figures")
    parser.add_argument("--previous", metavar="REV", help="also time this commit's dvc repro --force, just before")
    parser.add_argument("--previous-seconds", type=float, metavar="S",
                        help="instead of --previous: that commit's repro time, measured earlier on this machine "
                             "(say when and how with --previous-note)")
    parser.add_argument("--previous-commit", default="", help="with --previous-seconds: the commit it timed")
    parser.add_argument("--previous-note", default="", help="where --previous-seconds comes from")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each loop (median)")
    parser.add_argument("--out", default="reports/benchmark.json")
    args = parser.parse_args()

    import torch

    from dae.io import write_json
    from dae.params import load
    from dae.device import select_device

    params = load("params.yaml")
    device = select_device(params["device"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {name}")
    rates = {dtype: matmul_gflops(device, dtype) for dtype in ("float32", "bfloat16")}
    result: dict = {"device": name, "matmul_gflop_per_s": round(rates["float32"], 1),
                    "matmul_bf16_gflop_per_s": round(rates["bfloat16"], 1)}
    print(f"dense matmul: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 {rates['bfloat16']:.0f} GFLOP/s")
    out = ROOT / args.out

    if not args.skip_repro:
        print(f"data from {os.environ.get('DAE_DATA_MIRROR', 'the public mirrors')}")
        if args.previous:
            prev = previous_repro(args.previous)
            result |= {"previous_commit": prev["commit"], "previous_repro_seconds": prev["seconds"],
                       "previous_stage_seconds": prev["stage_seconds"],
                       "previous_peak_rss_total_mb": prev["peak_rss_total_mb"]}
        elif args.previous_seconds:
            result |= {"previous_commit": args.previous_commit, "previous_repro_seconds": args.previous_seconds,
                       "previous_note": args.previous_note}
        full = timed_repro(ROOT, f"{len(params['seeds'])} seeds")
        # ru_maxrss of children: the peak of the largest single stage process, in KiB on Linux.
        result |= {"repro_seconds": full["seconds"], "stage_seconds": full["stage_seconds"],
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                   "peak_rss_total_mb": full["peak_rss_total_mb"],
                   "stage_peak_rss_total_mb": full["stage_peak_rss_total_mb"], "seeds": len(params["seeds"]),
                   "matmul_gflop_per_s_after": round(matmul_gflops(device), 1)}
        print(f"dvc repro --force ({len(params['seeds'])} seeds): {full['seconds']:.0f} s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB (largest process), {result['peak_rss_total_mb']:.0f} MB "
              f"(all processes together); float32 matmul now {result['matmul_gflop_per_s_after']:.0f} GFLOP/s "
              f"(at the start {rates['float32']:.0f})")
        if "previous_repro_seconds" in result:
            result["speedup_vs_previous"] = round(result["previous_repro_seconds"] / full["seconds"], 2)
            print(f"previous {result['previous_repro_seconds']:.0f} s, now {full['seconds']:.0f} s: "
                  f"{result['speedup_vs_previous']:.2f}x")
    elif out.exists():  # keep the slow figures of the last full run
        result = json.loads(out.read_text()) | result
    result |= epoch_figures(params, device, args.repeats, rates)  # data/noisy exists now
    result["scaling"] = scaling_curve(params, device)
    if device.type == "cpu":
        result["lanes"] = lanes_figure(params, device)
    result["stage_startup_seconds"] = startup_seconds()
    print(f"stage start-up: {result['stage_startup_seconds']}")
    if device.type == "cuda":
        result["gpu_busy_fraction"] = gpu_busy_fractions(params, device)
        print(f"GPU busy (kernel time / wall time of stacked fine-tuning steps): {result['gpu_busy_fraction']}")
    write_json(out, result)  # atomically: temp file, then rename
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
