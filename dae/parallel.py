"""Run independent jobs (the seeds of a training stage, the classifiers of evaluate) side by side, one process each.

Why: at this project's matrix sizes one training process gains little from a second core (on
the 2-core CPU of reports/method.md, 2 threads do 1.2-1.5x the images/s of 1), while two or three
one-thread processes together do ~2x. The seeds of a stage are independent, so they can train
at once. On a CPU with deterministic kernels a model does not depend on the number of threads
that trained it, so a seed trained in a worker is bit-identical to the same seed trained alone
(tests/test_parallel.py checks it on pretrain_layer@1 and finetune@random_ft). On a GPU each
step is bound by its process's kernel launches, not by the GPU: measured on an H200, three
seeds in three processes did 2.2-2.4x the work of one process (reports/method.md).

`run_jobs(fn, jobs, workers=...)` calls `fn(job, send)` for every job, in `workers` worker
processes, or in this process one after the other when `workers` <= 1. `send(kind, payload)`
passes a message (e.g. one epoch's losses) to the caller's `on_message` as it happens; the
results come back in the order of `jobs`. The first job that fails stops the others and its
exception is raised here.

`run_commands(commands, lanes=...)` does the same one level up, for whole commands (the models
of the finetune stage, each a `python -m stages.finetune MODEL` with its own seeds and MLflow
run): `lanes` at a time, as `lane_count` says the seeds leave room for.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import subprocess
import time
import traceback
from typing import Any, Callable, Hashable, Mapping

log = logging.getLogger(__name__)

WORKERS_ENV = "DAE_SEED_WORKERS"  # how many seeds train at once: "auto" (default), or a number; 1 = one by one
# "off": draw no progress bars (set by run_commands' callers for commands that share a terminal).
PROGRESS_ENV = "DAE_PROGRESS"

Send = Callable[[str, Any], None]
OnMessage = Callable[[Hashable, str, Any], None]


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed, e.g. for lack of memory)."""


class CommandFailed(RuntimeError):
    """A command of run_commands exited with an error (it printed its own message)."""


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# What one worker may take at its peak: torch's import alone is ~0.5 GB resident (the CUDA
# build), the full MNIST training split as float32 clean + noisy images 0.35 GB. Measured: a
# fine-tuning worker peaks at ~1.0 GB RSS.
WORKER_MEMORY_BYTES = int(1.2 * 2**30)


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker_count(jobs: int, device_type: str, setting: str | None = None) -> int:
    """How many jobs to run at once; one means one by one, in this process. On a CPU: all of
    them, up to twice the cores (three one-thread workers on two cores do as many images/s
    together as two, and all finish together instead of in two rounds). On a GPU: all of them,
    up to one per core (each process feeds the GPU its own kernels; see the module's
    docstring). Either way no more than the available memory holds (WORKER_MEMORY_BYTES
    each). `setting` (default: $DAE_SEED_WORKERS) overrides: a number."""
    setting = (setting if setting is not None else os.environ.get(WORKERS_ENV, "auto")).strip().lower()
    if setting != "auto":
        try:
            requested = int(setting)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be 'auto' or a whole number, got {setting!r}") from None
        if requested < 1:
            raise ValueError(f"{WORKERS_ENV} must be at least 1, got {requested}")
        return min(requested, jobs)
    workers = min(jobs, 2 * cpu_count() if device_type == "cpu" else cpu_count())
    memory = available_memory()
    if memory is not None:
        workers = min(workers, memory // WORKER_MEMORY_BYTES)
    return max(1, workers)


def threads_per_worker(workers: int) -> int:
    return max(1, cpu_count() // workers)


# Processes at once on one GPU, each with its own CUDA context and copy of the data (~1 GB of GPU
# memory): a small GPU must hold them. Three seeds ran as three processes before models ran side
# by side; more than four at once has not been measured.
GPU_MAX_PROCESSES = 4


def lane_count(groups: int, jobs_per_group: int, device_type: str, setting: str | None = None) -> int:
    """How many groups of jobs (the models of the finetune stage, each with one job per seed) to
    run at once: as many as the worker slots of worker_count hold, at least one. On a 2-core
    CPU, one seed: all four models at once, on one thread each (a one-seed model leaves the
    second core nearly idle); three seeds: one model after another, each on 3 workers, as before.
    On a GPU no more than GPU_MAX_PROCESSES processes at once (one seed: four models; three
    seeds: one model after another)."""
    slots = worker_count(groups * jobs_per_group, device_type, setting)
    if device_type != "cpu":
        slots = min(slots, GPU_MAX_PROCESSES)
    return max(1, min(groups, slots // max(1, jobs_per_group)))


def _stop_with_parent() -> Callable[[], None] | None:
    """A preexec_fn for a child that must get SIGTERM when this process dies, even by SIGKILL,
    when it could not stop the child itself (Linux: prctl PR_SET_PDEATHSIG); None elsewhere."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)

    return set_signal


def run_commands(commands: Mapping[Hashable, list[str]], *, lanes: int, env: Mapping[str, str] | None = None,
                 poll_s: float = 0.2) -> None:
    """Run every command as a child process, `lanes` at a time in the order given, and wait for
    all of them. The children share this process's stdout and stderr. The first that fails
    stops the others (SIGTERM: a stage ends as when DVC interrupts it, its outputs not replaced)
    and raises CommandFailed naming it; so does an interrupt of this process. If this process
    is killed (SIGKILL), its children get SIGTERM too (on Linux) rather than train on."""
    pending = list(commands.items())
    running: dict[Hashable, subprocess.Popen] = {}
    preexec = _stop_with_parent()
    try:
        while pending or running:
            while pending and len(running) < lanes:
                key, command = pending.pop(0)
                running[key] = subprocess.Popen(command, env=None if env is None else dict(env), preexec_fn=preexec)
            time.sleep(poll_s)
            for key, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[key]
                if code != 0:
                    raise CommandFailed(f"{key} failed (exit code {code}; its error is above)"
                                        + ("; stopped the others" if running or pending else ""))
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_jobs(fn: Callable[[Any, Send], Any], jobs: Mapping[Hashable, Any], *, workers: int,
             on_message: OnMessage | None = None, log_format: str | None = None) -> dict[Hashable, Any]:
    """{key: fn(job, send)} for every (key, job) of `jobs`; see the module's docstring.

    `fn` must be a module-level function and the jobs and results picklable (they travel to
    and from the worker processes). `log_format`: the logging format of the workers' log lines."""
    on_message = on_message or (lambda key, kind, payload: None)
    if workers <= 1 or len(jobs) <= 1:
        results = {}
        for key, job in jobs.items():
            results[key] = fn(job, lambda kind, payload, key=key: on_message(key, kind, payload))
        return results
    return _run_in_processes(fn, jobs, workers, on_message, log_format)


def _worker(fn: Callable, key: Hashable, job: bytes, messages: Any, threads: int, log_format: str | None,
            caller_alive: Any) -> None:
    """A worker process: one job, its messages and its result (or error) through `messages`.
    `caller_alive`: the read end of a pipe that only the calling process holds open."""
    import torch

    torch.set_num_threads(threads)
    if log_format:
        logging.basicConfig(level=logging.INFO, format=log_format, datefmt="%H:%M:%S")

    def send(kind: str, payload: Any) -> None:
        # Nobody writes to the pipe, so it polls ready only at EOF: the caller is gone (e.g. the
        # stage process was SIGKILLed and could not stop us). Stop; do not train on. (Our parent
        # is the fork server, which lives on as long as its children do: no use watching it.)
        if caller_alive.poll():
            raise SystemExit(f"job {key!r}: the stage process is gone")
        messages.put((key, kind, payload))

    try:
        result = fn(pickle.loads(job), send)
        messages.put((key, "result", pickle.dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, which raises it
        try:
            pickle.dumps(exc)
            error = exc
        except Exception:  # noqa: BLE001 - an exception that cannot travel goes as its traceback
            error = RuntimeError(f"job {key!r} failed:\n{traceback.format_exc()}")
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: say so plainly
            error = RuntimeError(f"job {key!r} was interrupted ({type(exc).__name__})")
        messages.put((key, "error", error))


def _context():
    # Workers fork from a server process that imported torch once, instead of each importing it
    # anew (spawn): measured, a stage starts its seeds a few seconds sooner and its processes take
    # ~0.4 GB less memory together (PSS). Plain fork would copy this process's torch threads.
    # torch._dynamo too: torch.optim imports it when an optimizer is made (~1.4 s a process).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", "torch._dynamo"])
    return context


def start_server() -> None:
    """Start the workers' fork server now. It does its imports (~2.5 s) in the background, beside
    the caller's own start-up, instead of while the first worker waits for them."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _run_in_processes(fn, jobs, workers, on_message, log_format) -> dict:
    context = _context()
    messages = context.Queue()
    caller_alive, caller_alive_writer = context.Pipe(duplex=False)
    threads = threads_per_worker(workers)
    pending = list(jobs.items())
    running: dict[Hashable, Any] = {}
    results: dict[Hashable, Any] = {}
    log.info("training %d jobs in %d worker processes of %d thread(s) each (%s=1: one by one)",
             len(jobs), min(workers, len(jobs)), threads, WORKERS_ENV)
    try:
        while pending or running:
            while pending and len(running) < workers:
                key, job = pending.pop(0)
                # Jobs and results travel as plain pickles: through multiprocessing's own pickler,
                # torch would pass tensors as shared memory that vanishes with the worker.
                process = context.Process(target=_worker,
                                          args=(fn, key, pickle.dumps(job), messages, threads, log_format,
                                                caller_alive),
                                          name=f"dae-worker-{key}", daemon=True)
                process.start()
                running[key] = process
            try:
                key, kind, payload = messages.get(timeout=1.0)
            except queue.Empty:
                for key, process in running.items():
                    if not process.is_alive():  # give a result already on its way a moment to arrive
                        try:
                            key2, kind, payload = messages.get(timeout=5.0)
                        except queue.Empty:
                            raise WorkerDied(f"the worker of job {key!r} ended with exit code "
                                             f"{process.exitcode} and no result (out of memory?)") from None
                        _handle(key2, kind, payload, running, results, on_message)
                        break
                continue
            _handle(key, kind, payload, running, results, on_message)
    finally:
        for process in running.values():  # a failure (or Ctrl-C) stops the rest
            process.terminate()
        for process in running.values():
            process.join(timeout=10)
        caller_alive.close()
        caller_alive_writer.close()
    return {key: results[key] for key in jobs}


def _handle(key, kind, payload, running, results, on_message) -> None:
    if kind == "error":
        raise payload
    if kind == "result":
        results[key] = pickle.loads(payload)
        running.pop(key).join()
    else:
        on_message(key, kind, payload)
