"""Load: N queued tiny-profile experiments run by J parallel DVC queue workers; is anything lost?

    python bench/load_test.py --postgres postgresql+psycopg://user:pw@127.0.0.1/db   # both parts
    python bench/load_test.py --only sqlite                                           # no PostgreSQL

Part "server": an authenticated `mlflow server --app-name basic-auth` on PostgreSQL (fresh
databases made beside the one --postgres names; its role needs CREATEDB), N = 16, J = 4, as an
EDIT user. Part "sqlite": the default store (`mlflow.db`), N = 8, J = 4. Each experiment is the
tiny profile with its own noise level and seed. Afterwards the store is audited against what the
params say must be there, exactly: every stage run and nested seed run FINISHED, every metric
point (per run, key and step), every artifact, every logged model and every registered model
version. Writes reports/load_test.json: {"server": {...}, "sqlite": {...}} with experiments,
workers, runs, metric_points, lost, duplicated, failed_workers, server_errors, seconds (and the
per-item detail of anything lost or duplicated). tests/test_server.py runs a small version
(N = 6, J = 3) with the same audit (tests/team_server.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.team_server import TrackingServer, audit, executions_params, run_queue, team_user  # noqa: E402


def load_part(store: str, n: int, workers: int, postgres: str | None, work: Path, mnist: Path,
              timeout: float = 3600) -> dict:
    """One part of the benchmark; returns its figures."""
    from mlflow import MlflowClient

    from tests.workspace import make_workspace

    server = None
    env = {"OMP_NUM_THREADS": "1"}  # J workers share the cores
    if store == "server":
        server = TrackingServer.authenticated(postgres, work, "dae_load")
        server.start()
        password = team_user(server, "worker", edit=True)
        env |= {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "worker",
                "MLFLOW_TRACKING_PASSWORD": password}
    ws = work / "repo"
    ws.mkdir()
    try:
        run = make_workspace(ws, mnist, env)
        run(sys.executable, "-m", "dvc", "repro", "noise")  # the data once, before the queue copies it
        run("git", "add", "-A")
        run("git", "commit", "-q", "-m", "data")
        states, seconds = run_queue(run, n, workers, timeout)
        if server:
            os.environ.update({k: v for k, v in env.items() if k.startswith("MLFLOW_")})
            client = MlflowClient(server.url)
            errors = server.errors()
        else:
            client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
            logs = "\n".join(run(sys.executable, "-m", "dvc", "queue", "logs", name, check=False).stdout
                             for name in states)
            errors = [line for line in logs.splitlines() if re.search(r"Traceback|database is locked", line)]
        result = audit(client, "dae-mnist", executions_params(ws, n))
    finally:
        if server:
            server.stop()
    return {"experiments": n, "workers": workers, "runs": result.runs, "metric_points": result.metric_points,
            "lost": result.lost, "duplicated": result.duplicated,
            "failed_workers": sum(state != "Success" for state in states.values()),
            "server_errors": len(errors), "seconds": round(seconds, 1),
            "store": "mlflow server --app-name basic-auth on PostgreSQL" if server else "SQLite (mlflow.db)",
            "problems": result.problems[:50], "error_lines": errors[:20],
            "worker_states": {k: v for k, v in states.items() if v != "Success"}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/load_test.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("DAE_TEST_POSTGRES_URI"),
                        help="a PostgreSQL URI whose role may create databases (default: $DAE_TEST_POSTGRES_URI)")
    parser.add_argument("--only", choices=["server", "sqlite"])
    parser.add_argument("--server-n", type=int, default=16)
    parser.add_argument("--server-j", type=int, default=4)
    parser.add_argument("--sqlite-n", type=int, default=8)
    parser.add_argument("--sqlite-j", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "load_test.json")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    mnist = Path(os.environ.get("DAE_DATA_MIRROR") or ROOT.parent / "shared" / "data" / "mnist")
    parts = [args.only] if args.only else ["server", "sqlite"]
    if "server" in parts and not args.postgres:
        raise SystemExit("the server part needs --postgres (or DAE_TEST_POSTGRES_URI); --only sqlite skips it")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    import torch

    from bench.benchmark import matmul_gflops

    # Wall times depend on the machine: record how fast it was (README "Measuring").
    results["machine"] = {"cpus": os.cpu_count(), "float32_matmul_gflops": round(
        matmul_gflops(torch.device("cpu")), 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for part in parts:
        n, j = (args.server_n, args.server_j) if part == "server" else (args.sqlite_n, args.sqlite_j)
        print(f"{part}: {n} experiments, {j} workers ...", flush=True)
        if args.keep:
            (args.keep / part).mkdir(parents=True)
            results[part] = load_part(part, n, j, args.postgres, args.keep / part, mnist)
        else:
            with tempfile.TemporaryDirectory(prefix=f"dae-load-{part}-") as work:
                results[part] = load_part(part, n, j, args.postgres, Path(work), mnist)
        print(json.dumps(results[part], indent=2), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
