import signal
import threading
import time

import pytest
import torch

from dae.lanes import in_lanes, lane_count, split
from dae.model import TiedAutoencoder
from dae.train import FitConfig, fit, reconstruction_loss, shared

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("members, cores, lanes", [
    (1, 2, 1),   # nothing to split
    (2, 2, 2),
    (3, 2, 3),   # 2 + 1 would leave a core idle half the time: one lane each, time-sliced
    (6, 2, 2),   # 2 lanes of 3: every split costs the same in the model; the fewest lanes
    (4, 4, 4),
    (6, 1, 1),   # a single core: one stack
])
def test_lane_count_on_a_cpu(members, cores, lanes):
    assert lane_count(members, CPU, cores) == lanes


def test_a_gpu_trains_one_stack():
    assert lane_count(48, CUDA, 16) == 1


def test_split_keeps_order_in_nearly_equal_groups():
    assert split([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split(["a", "b", "c"], 3) == [["a"], ["b"], ["c"]]


def test_each_lane_runs_on_one_thread_and_the_count_is_restored():
    before = torch.get_num_threads()
    seen = {}

    def train(lane):
        seen[tuple(lane)] = (threading.current_thread().name, torch.get_num_threads())
        return [member * 10 for member in lane]

    assert in_lanes([1, 2, 3], CPU, train) == [10, 20, 30]
    if before >= 2:  # on one core there is one lane, in the calling thread
        assert len(seen) == 3 and {threads for _, threads in seen.values()} == {1}
        assert len({name for name, _ in seen.values()}) == 3
    assert torch.get_num_threads() == before


def test_an_error_in_a_lane_is_raised_after_every_lane_stopped(monkeypatch):
    monkeypatch.setattr("dae.lanes.lane_count", lambda members, device: members)
    finished = []

    def train(lane):
        if lane == [1]:
            raise ValueError("lane 1 failed")
        time.sleep(0.2)
        finished.append(lane[0])
        return lane

    with pytest.raises(ValueError, match="lane 1 failed"):
        in_lanes([0, 1, 2], CPU, train)
    assert sorted(finished) == [0, 2]


def test_an_interrupted_stage_unwinds_its_lanes(monkeypatch):
    """SIGTERM in the main thread (stages.common raises SystemExit there): every lane gets
    SystemExit at its next Python line and leaves its `finally` blocks (dae.io removes a
    half-written temporary file in one) before the error reaches the caller."""
    monkeypatch.setattr("dae.lanes.lane_count", lambda members, device: members)
    unwound, started = [], threading.Barrier(2)

    def train(lane):
        started.wait()
        try:
            while True:
                time.sleep(0.01)
        finally:
            unwound.append(lane[0])

    def interrupted(signum, frame):
        raise SystemExit("interrupted by SIGTERM")

    previous = signal.signal(signal.SIGALRM, interrupted)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(SystemExit, match="SIGTERM"):
            in_lanes([0, 1], CPU, train)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(unwound) == [0, 1]
    time.sleep(0.05)  # the threads end right after their last line
    assert not [t for t in threading.enumerate() if t.name.startswith("lane ") and t.is_alive()]


def test_a_member_trains_to_the_same_bits_in_any_lane(monkeypatch):
    """Three seeds in three one-thread lanes side by side give exactly the bits of each seed
    trained alone on one thread: the lanes do not touch one another."""
    monkeypatch.setattr("dae.lanes.lane_count", lambda members, device: members)
    images = torch.rand(300, 64, generator=torch.Generator().manual_seed(0))
    config = FitConfig(epochs=2, batch_size=32, lr=3e-3)

    def train(lane):
        models = []
        for seed in lane:
            model = TiedAutoencoder([64, 24, 8])
            model.reset_parameters(1.0, torch.Generator().manual_seed(seed))
            models.append(model)
        stack = TiedAutoencoder.stacked(models)
        m = len(lane)
        fit(stack, reconstruction_loss, (shared(images[:256], m), shared(images[:256], m)),
            (shared(images[256:], m), shared(images[256:], m)), config, seeds=lane,
            desc=[str(seed) for seed in lane], progress=False)
        return [model.state_dict() for model in stack.unstacked()]

    side_by_side = in_lanes([0, 1, 2], CPU, train)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [train([seed])[0] for seed in (0, 1, 2)]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(side_by_side, alone):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
