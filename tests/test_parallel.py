"""dae.parallel: seeds trained side by side in worker processes give what training them one by
one gives, messages arrive as they are sent, and a failing job stops the stage with its error."""
import csv
import os
import re
import time

import pytest

from dae import parallel
from dae.parallel import WORKERS_ENV, CommandFailed, lane_count, run_commands, run_jobs, worker_count
from workspace import prepare_workspace


def _square(job, send):
    send("start", job)
    send("epoch", {"epoch": 1, "value": job * job})
    return {"pid": os.getpid(), "value": job * job}


def _fails_on_two(job, send):
    if job == 2:
        raise ValueError(f"job {job} cannot be trained")
    time.sleep(30 if job == 1 else 0)  # would hold the test up if a failure did not stop it
    return job


def _killed_on_two(job, send):
    if job == 2:
        os.kill(os.getpid(), 9)  # as the kernel's out-of-memory killer would
    time.sleep(30 if job == 1 else 0)
    return job


def _parent_pid(job, send):
    return os.getppid()


def test_processes_return_what_one_by_one_returns_in_job_order():
    jobs = {seed: seed + 1 for seed in (2, 0, 1)}
    for workers in (1, 3):
        messages = []
        results = run_jobs(_square, jobs, workers=workers,
                           on_message=lambda key, kind, payload: messages.append((key, kind, payload)))
        assert list(results) == [2, 0, 1]
        assert [r["value"] for r in results.values()] == [9, 1, 4]
        pids = {r["pid"] for r in results.values()}
        assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids and len(pids) == 3)
        for key, job in jobs.items():  # each job's messages, in the order it sent them
            sent = [m[1:] for m in messages if m[0] == key]
            assert sent == [("start", job), ("epoch", {"epoch": 1, "value": job * job})]


def test_start_server_starts_the_fork_server_that_the_workers_then_come_from():
    parallel.start_server()  # a stage calls it before its own start-up (MLflow), see stages.common
    servers = {pid for pid in _descendants(os.getpid()) if b"forkserver" in _cmdline(pid)}
    assert len(servers) == 1
    parallel.start_server()  # a second call starts no other server
    results = run_jobs(_parent_pid, {1: 1, 2: 2}, workers=2)
    assert set(results.values()) == servers


def test_a_failing_job_raises_its_error_and_stops_the_others():
    start = time.monotonic()
    with pytest.raises(ValueError, match="job 2 cannot be trained"):
        run_jobs(_fails_on_two, {1: 1, 2: 2}, workers=2)
    assert time.monotonic() - start < 20  # job 1 (30 s) was stopped, not waited for


def test_a_killed_worker_is_a_clear_error_and_stops_the_others():
    start = time.monotonic()
    with pytest.raises(parallel.WorkerDied, match=r"the worker of job 2 ended with exit code -9 and no result"):
        run_jobs(_killed_on_two, {1: 1, 2: 2}, workers=2)
    assert time.monotonic() - start < 20


def test_worker_count(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert worker_count(1, "cpu") == 1
    assert 1 <= worker_count(3, "cpu") <= 3
    assert worker_count(3, "cpu", "1") == 1 and worker_count(3, "cpu", "8") == 3
    # Not more workers than the available memory holds (here: room for two).
    monkeypatch.setattr(parallel, "available_memory", lambda: int(2.5 * parallel.WORKER_MEMORY_BYTES))
    monkeypatch.setattr(parallel, "cpu_count", lambda: 16)
    assert worker_count(3, "cpu") == 2
    assert worker_count(3, "cuda") == 2  # a GPU's workers hold host memory too
    monkeypatch.setattr(parallel, "available_memory", lambda: None)
    assert worker_count(3, "cuda") == 3  # one GPU: every seed in its own process at once
    monkeypatch.setattr(parallel, "cpu_count", lambda: 2)
    assert worker_count(3, "cpu") == 3 and worker_count(3, "cuda") == 2  # GPU: one per core
    monkeypatch.setattr(parallel, "available_memory", lambda: parallel.WORKER_MEMORY_BYTES // 2)
    assert worker_count(3, "cpu") == 1
    monkeypatch.setenv(WORKERS_ENV, "2")
    assert worker_count(3, "cuda") == 2
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match=WORKERS_ENV):
            worker_count(3, "cpu", bad)


def test_lane_count_runs_models_side_by_side_only_where_the_seeds_leave_room(monkeypatch):
    monkeypatch.setattr(parallel, "cpu_count", lambda: 2)
    monkeypatch.setattr(parallel, "available_memory", lambda: 64 * 2**30)
    assert lane_count(4, 1, "cpu", "auto") == 4  # one seed: all four models at once
    assert lane_count(4, 2, "cpu", "auto") == 2
    assert lane_count(4, 3, "cpu", "auto") == 1  # three seeds fill the 2-core CPU alone
    assert lane_count(2, 1, "cpu", "auto") == 2
    assert lane_count(4, 1, "cpu", "1") == 1  # DAE_SEED_WORKERS=1: one by one
    monkeypatch.setattr(parallel, "available_memory", lambda: 2 * parallel.WORKER_MEMORY_BYTES)
    assert lane_count(4, 1, "cpu", "auto") == 2  # as many as the memory holds
    monkeypatch.setattr(parallel, "cpu_count", lambda: 16)
    monkeypatch.setattr(parallel, "available_memory", lambda: 64 * 2**30)
    assert lane_count(4, 1, "cuda", "auto") == 4  # a GPU: four processes at most (its memory)
    assert lane_count(4, 3, "cuda", "auto") == 1


def test_run_commands_runs_side_by_side_and_stops_the_rest_on_a_failure(tmp_path):
    import sys

    python = sys.executable
    started = time.monotonic()
    run_commands({name: [python, "-c", f"import time; time.sleep(1); open({str(tmp_path / name)!r}, 'w')"]
                  for name in ("a", "b", "c")}, lanes=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    assert time.monotonic() - started < 2.9  # at once, not one after another
    started = time.monotonic()
    with pytest.raises(CommandFailed, match=r"^fails failed \(exit code 3; its error is above\); stopped the others"):
        run_commands({"slow": [python, "-c", "import time; time.sleep(60)"],
                      "fails": [python, "-c", "raise SystemExit(3)"],
                      "queued": [python, "-c", "raise SystemExit('must not start')"]}, lanes=2)
    assert time.monotonic() - started < 30  # the slow one was stopped


def test_commands_stop_when_their_parent_is_killed(tmp_path):
    """SIGKILL of the process that runs the commands (a finetune stage) must not leave them running."""
    import subprocess
    import sys

    code = ("import sys; from dae.parallel import run_commands; "
            "run_commands({'a': [sys.executable, '-c', 'import time; time.sleep(60)']}, lanes=1)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=parallel.__file__.rsplit("/dae/", 1)[0])
    deadline = time.monotonic() + 30
    while not _descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = _descendants(parent.pid)
    assert children
    time.sleep(0.5)  # the child is past its preexec_fn
    parent.kill()
    parent.wait()
    alive = _still_running(children, timeout=10)
    assert not alive, f"commands {alive} still run after their parent was killed"


def test_finetune_stage_trains_models_side_by_side_to_the_same_bytes(tmp_path, mnist_mirror):
    """`python -m stages.finetune shallow random_ft` (one seed: both at once, one thread each)
    writes the files that running them one by one, on all cores, writes."""
    ws = prepare_workspace(tmp_path / "ws", mnist_mirror)
    outputs = {}
    for how, commands in (("apart", [("shallow",), ("random_ft",)]), ("together", [("shallow", "random_ft")])):
        for models in commands:
            result = ws.stage("stages.finetune", *models)
            assert result.returncode == 0, result.stderr
        outputs[how] = ws.snapshot("data/models/finetune")
        assert ("2 at a time (1 thread(s) each)" in result.stderr) == (how == "together")
    assert set(outputs["apart"]) == {"shallow.pt", "random_ft.pt"}
    assert outputs["apart"] == outputs["together"]


def test_finetune_stage_reports_the_model_that_failed(tmp_path, mnist_mirror):
    """No pretrained stack (pretrain_layer 2..8 never ran): greedy and greedy_ft fail with their
    own error, the stage with one line naming the model, and exit code 1."""
    ws = prepare_workspace(tmp_path / "ws", mnist_mirror)
    result = ws.stage("stages.finetune")
    assert result.returncode == 1
    assert "ERROR in stage finetune@greedy" in result.stderr and "layer_8.pt" in result.stderr
    assert re.search(r"ERROR in stage finetune: finetune@greedy(_ft)? failed \(exit code 1", result.stderr)
    assert "Traceback" not in result.stderr
    assert not list((ws.path / "data/models").rglob("*.tmp*"))  # nothing half-written


def _curve(path):
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def test_stages_train_the_same_models_in_workers_as_one_by_one(tmp_path, mnist_mirror):
    """The tiny profile with two seeds: pretrain_layer@1 and finetune@random_ft, once with the
    seeds one by one in the stage's process and once in two one-thread workers. The model files
    are byte-identical; the losses they log agree to float precision (the validation loss is a
    sum over a batch, whose order of addition may depend on the thread count)."""
    ws = prepare_workspace(tmp_path / "ws", mnist_mirror)
    ws.set_param("seeds", [0, 1])
    outputs = {}
    for workers in ("1", "2"):
        for stage in (("stages.pretrain_layer", "1"), ("stages.finetune", "random_ft")):
            result = ws.stage(*stage, env={WORKERS_ENV: workers})
            assert result.returncode == 0, result.stderr
            assert ("worker processes" in result.stderr) == (workers == "2")
        outputs[workers] = {
            "models": ws.snapshot("data/models"),
            "curves": {name: _curve(ws.path / "reports/curves" / name)
                       for name in ("pretrain_layer_1.csv", "finetune_random_ft.csv")}}
    assert set(outputs["1"]["models"]) == {"pretrain/layer_1.pt", "finetune/random_ft.pt"}
    assert outputs["1"]["models"] == outputs["2"]["models"]
    for name, curve in outputs["1"]["curves"].items():
        other = outputs["2"]["curves"][name]
        assert len(curve) == len(other) > 0
        for row, row2 in zip(curve, other):
            assert row == pytest.approx(row2, rel=1e-5)


def test_a_bad_worker_setting_is_a_clear_error(tmp_path, mnist_mirror):
    ws = prepare_workspace(tmp_path / "ws", mnist_mirror)
    result = ws.stage("stages.finetune", "shallow", env={WORKERS_ENV: "many"})
    assert result.returncode == 1
    assert f"{WORKERS_ENV} must be 'auto' or a whole number, got 'many'" in result.stderr
    assert "Traceback" not in result.stderr


def _cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:  # it ended meanwhile
        return b""


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (the workers are the fork server's children, not the stage's)."""
    children: dict[int, set[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), set()).add(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def _still_running(pids: set[int], timeout: float) -> list[int]:
    """The processes of `pids` still running (not ended, not zombies) after waiting up to `timeout` s for them to end."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")
                 and _stat_state(pid) not in ("", "Z")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _stat_state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0]
    except (OSError, IndexError):  # it ended meanwhile
        return ""


def test_workers_stop_when_the_stage_process_is_killed(tmp_path, mnist_mirror):
    """SIGKILL of a stage (no chance to stop its workers) must not leave them training on."""
    import subprocess
    import sys

    ws = prepare_workspace(tmp_path / "ws", mnist_mirror)
    ws.set_param("seeds", [0, 1])
    ws.set_param("finetune.epochs", 200)
    proc = subprocess.Popen([sys.executable, "-m", "stages.finetune", "random_ft"], cwd=ws.path,
                            env={**ws.env, WORKERS_ENV: "2"}, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "epoch 2/200" in line:
            break
    workers = _descendants(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    alive = _still_running(workers, timeout=30)
    assert not alive, f"workers {alive} still run after their stage was killed"
