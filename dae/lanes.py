"""Stacked members trained side by side on a multi-core CPU: lanes.

A GPU trains all of a stage's members as one stack: stacking is what fills it. A CPU runs one
stack's many small ops on all its cores, and on 2 cores spends about a third of each step on the
threads' synchronisation: two threads reach 1.56x one. So on a CPU the members are split into
lanes, each lane a smaller stack trained by `dae.train.fit` on one thread, the lanes concurrently
in threads of the one stage process (PyTorch releases the GIL inside its ops). On 2 cores
(reports/method.md): the 8+8 fine-tuning of 6 members runs at 34.0k images/s as 2 lanes of 3
against 26.7k as one stack, the first pretraining layer's 3 members at 41.4k as 3 lanes against
33.7k. A lane on one thread computes the same bits however the OS schedules the lanes.
"""
from __future__ import annotations

import ctypes
import math
import threading
from typing import Callable, Sequence, TypeVar

import torch

Member = TypeVar("Member")
Result = TypeVar("Result")

# One stack on all cores runs at this fraction of the cores' single-thread speed (2 cores, 8+8 bf16).
STACK_EFFICIENCY = 0.78


def lane_count(members: int, device: torch.device, cores: int | None = None) -> int:
    """How many lanes `members` train in: 1 on a GPU or a single core; on a CPU the count with the
    least time in a simple model (a lane's members one after the other; lanes beyond the cores
    time-sliced by the OS), the fewest lanes on a tie. 2 cores: 3 members -> 3 lanes, 6 -> 2."""
    cores = cores or torch.get_num_threads()
    if device.type != "cpu" or cores < 2 or members < 2:
        return 1

    def cost(lanes: int) -> float:
        if lanes == 1:
            return members / (cores * STACK_EFFICIENCY)
        return math.ceil(members / lanes) * max(1.0, lanes / cores)

    return min(range(1, members + 1), key=lambda lanes: (cost(lanes), lanes))


def split(members: Sequence[Member], lanes: int) -> list[list[Member]]:
    """`members` in `lanes` consecutive groups of (nearly) equal size."""
    size = math.ceil(len(members) / lanes)
    return [list(members[i:i + size]) for i in range(0, len(members), size)]


def in_lanes(members: Sequence[Member], device: torch.device,
             train: Callable[[list[Member]], list[Result]]) -> list[Result]:
    """`train(lane)` -> one result per member of `lane`, for each lane of `members` (lane_count),
    the lanes concurrently, each on one thread; the results in the order of `members`. An error
    in a lane is raised once every lane has stopped."""
    lanes = split(members, lane_count(len(members), device))
    if len(lanes) == 1:
        return train(lanes[0])
    outputs: list[list[Result] | None] = [None] * len(lanes)
    errors: list[BaseException | None] = [None] * len(lanes)

    done = [threading.Event() for _ in lanes]

    def run(i: int) -> None:
        torch.set_num_threads(1)
        try:
            outputs[i] = train(lanes[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
            errors[i] = exc
        finally:
            done[i].set()

    _return_large_blocks_to_the_os()
    threads_before = torch.get_num_threads()
    threads = [threading.Thread(target=run, args=(i,), name=f"lane {i}", daemon=True) for i in range(len(lanes))]
    try:
        for thread in threads:
            thread.start()
        # Events, not Thread.join: a signal that interrupts join marks a live thread as stopped.
        for lane_done in done:
            lane_done.wait()
    except BaseException:  # e.g. SIGTERM's SystemExit (stages.common): stop the lanes, then go on
        _stop(threads, done)
        raise
    finally:
        torch.set_num_threads(threads_before)
    for error in errors:
        if error is not None:
            raise error
    return [result for output in outputs for result in output]


# Allocations from this size up are mapped from the OS and unmapped when freed (glibc's M_MMAP_THRESHOLD).
LARGE_BLOCK = 16 << 20


def _return_large_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold at LARGE_BLOCK. By default glibc raises it to the largest block
    freed so far (up to 32 MB), and blocks below it stay in the malloc arena of the thread that
    freed them; each lane thread has its own arena, so each kept its own peak of validation and
    centring tensors (`finetune`: +170 MB resident against one stack, none with this). A step's
    tensors are far smaller and keep being reused from the arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to set
        return
    libc.mallopt(-3, LARGE_BLOCK)  # -3: M_MMAP_THRESHOLD


def _stop(threads: list[threading.Thread], done: list[threading.Event]) -> None:
    """Raise SystemExit in each running lane at its next Python line and wait for it to unwind, so
    that a lane interrupted while writing its checkpoint removes the temporary file (dae.io)."""
    for thread, lane_done in zip(threads, done):
        if not lane_done.is_set() and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
    for lane_done in done:
        lane_done.wait()
