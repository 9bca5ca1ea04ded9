"""The GPU check in one run, for a lent GPU machine whose image has PyTorch but neither DVC nor MLflow.

    DAE_DATA_MIRROR=$PWD/shared/data/mnist python3 bench/device_run.py --out "$OUT"

1. Every stage of dvc.yaml, in its order, as `dvc repro --force` runs them (the same command
   lines), with tracking off (DAE_TRACKING=off: no MLflow needed): the seconds of each and in all.
2. The results: all 12 cells of the slide met or not (reports/metrics.json, results.md).
3. bench/benchmark.py's device figures: the matmul rates, the scaling curve of M stacked members,
   the stage start-up, and on CUDA the GPU's busy fraction of stacked fine-tuning steps.

Writes OUT/benchmark_gpu.json and copies results.md and metrics.json beside it. It runs in the
repository it lives in and replaces its data/ and reports/ (and, with --params, its params.yaml):
on a lent machine that is a throwaway copy; on a CPU, run it in a copy (a tiny profile makes it
quick: `--params tests/tiny_params.yaml --members 1,6`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def merge(params: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        params[key] = merge(params.get(key, {}), value) if isinstance(value, dict) else value
    return params


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/device_run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for benchmark_gpu.json and the results")
    parser.add_argument("--params", help="a YAML of overrides merged into params.yaml first (e.g. tests/tiny_params.yaml)")
    parser.add_argument("--members", default="1,3,6,12,24,48", help="the scaling curve's stack sizes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    if args.params:
        params_file = ROOT / "params.yaml"
        merged = merge(yaml.safe_load(params_file.read_text()), yaml.safe_load(Path(args.params).read_text()))
        params_file.write_text(yaml.safe_dump(merged, sort_keys=False))

    import torch

    import benchmark  # bench/benchmark.py: the device figures
    from dae.device import select_device
    from dae.params import load
    from stages.common import stage_commands

    params = load("params.yaml")
    device = select_device(params["device"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rates = {dtype: round(benchmark.matmul_gflops(device, dtype), 1) for dtype in ("float32", "bfloat16")}
    result: dict = {"device": name, "torch": torch.__version__, "matmul_gflop_per_s": rates["float32"],
                    "matmul_bf16_gflop_per_s": rates["bfloat16"], "seeds": len(params["seeds"])}
    print(f"{name}: dense matmul {rates}", flush=True)

    env = {**os.environ, "DAE_TRACKING": "off", "PYTHONPATH": str(ROOT)}
    stage_seconds, start = {}, time.perf_counter()
    for stage, argv in stage_commands(ROOT / "dvc.yaml"):
        began = time.perf_counter()
        print(f"--- {stage}", flush=True)
        if subprocess.run(argv, env={**env, "DVC_STAGE": stage}).returncode != 0:
            raise SystemExit(f"stage {stage} failed")
        stage_seconds[stage] = round(time.perf_counter() - began, 1)
    result |= {"repro_seconds": round(time.perf_counter() - start, 1), "stage_seconds": stage_seconds}
    print(f"all stages: {result['repro_seconds']} s", flush=True)

    table = (ROOT / "reports" / "results.md").read_text()
    result["cells_met"] = sum(line.count("✓") for line in table.splitlines() if line.startswith(("| 1+1", "| 8+8")))
    for report in ("results.md", "metrics.json"):
        shutil.copy2(ROOT / "reports" / report, out / report)

    members = tuple(int(m) for m in args.members.split(","))
    result["scaling"] = benchmark.scaling_curve(params, device, sizes=members)
    # A machine without MLflow (tracking off) starts stages without it.
    steps = {k: v for k, v in benchmark.STARTUP_STEPS.items() if k != "mlflow" or importlib.util.find_spec("mlflow")}
    result["stage_startup_seconds"] = benchmark.startup_seconds(steps=steps)
    if device.type == "cuda":
        result["gpu_busy_fraction"] = benchmark.gpu_busy_fractions(params, device)
    (out / "benchmark_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "scaling"}, indent=1))


if __name__ == "__main__":
    main()
