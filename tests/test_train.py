import contextlib
import copy
import math

import pytest
import torch

from dae.model import TiedAutoencoder
from dae.noise import corrupt
from dae.train import (FitConfig, TrainingDiverged, autocast, fit, make_optimizer, reconstruction_loss, shared,
                       training_step)


@pytest.fixture(scope="module")
def digits(mnist_raw):
    from dae.data import read_idx_split

    images, labels = read_idx_split(mnist_raw, "train")
    x = torch.from_numpy(images[:3000].copy()).float() / 255
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, noisy, torch.from_numpy(labels[:3000].copy())


def fit_alone(model, loss_fn, train, val, config, seed=0, desc="test", **kwargs):
    """`fit` of one plain model (M = 1): its parameters are copied back; returns its FitResult."""
    stack = TiedAutoencoder.stacked([model])
    result, = fit(stack, loss_fn, [shared(t, 1) for t in train], [shared(t, 1) for t in val], config,
                  seeds=[seed], desc=[desc], **kwargs)
    model.load_state_dict(stack.unstacked()[0].state_dict())
    return result


def seeded(sizes, seed, gain=1.0, **kwargs):
    model = TiedAutoencoder(sizes, **kwargs)
    model.reset_parameters(gain, torch.Generator().manual_seed(seed))
    return model


def fresh_noise(batch, generators):
    clean = batch[0]
    return torch.stack([corrupt(clean[i], "gaussian", 0.3, g) for i, g in enumerate(generators)]), clean


def test_stacked_members_reach_what_each_reaches_alone(digits):
    """Three seeds stacked: each member's parameters after two epochs (its own init, batch order,
    fresh noise and centring offsets) are those of the same seed trained alone, to float tolerance."""
    x, noisy, _ = digits
    config = FitConfig(epochs=2, batch_size=64, lr=3e-3, warmup_epochs=0.5)
    seeds = [0, 1, 2]
    val = (noisy[2500:2700], x[2500:2700])

    def train(models, member_seeds):
        stack = TiedAutoencoder.stacked(models)
        results = fit(stack, reconstruction_loss, (shared(x[:640], len(models)),),
                      [shared(t, len(models)) for t in val], config, seeds=member_seeds,
                      desc=[f"seed {s}" for s in member_seeds], augment=fresh_noise,
                      epoch_context=lambda: stack.centered(noisy[:300]), progress=False)
        return stack.unstacked(), results

    together, results = train([seeded([784, 48, 16], s, linear_code=True) for s in seeds], seeds)
    for i, seed in enumerate(seeds):
        (alone,), (result,) = train([seeded([784, 48, 16], seed, linear_code=True)], [seed])
        for a, b in zip(together[i].parameters(), alone.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert results[i].history[-1]["val_loss"] == pytest.approx(result.history[-1]["val_loss"], rel=1e-5)
    # ... and the members differ where they must: another seed, another init, order and noise.
    assert not torch.allclose(together[0].weights[0], together[1].weights[0])
    assert results[0].history[-1]["train_loss"] != results[1].history[-1]["train_loss"]


def test_stacked_classifiers_match_each_trained_alone():
    """evaluate's classifiers: one stack of members with their own codes gives each member's
    accuracy and weights as it would alone."""
    from dae.evaluate import accuracy, train_classifiers

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1200,), generator=g)
    codes = torch.stack([torch.randn(10, 5, generator=g)[labels] * 3 + torch.randn(1200, 5, generator=g)
                         for _ in range(2)])  # two members, each with its own codes
    config = FitConfig(3, 64, 1e-2)
    both = train_classifiers(codes[:, :900], labels[:900], codes[:, 900:], labels[900:], 16, config, [0, 1],
                             ["a", "b"], progress=False)
    acc_both = accuracy(both, codes[:, 900:], labels[900:])
    for i in range(2):
        alone = train_classifiers(codes[i:i + 1, :900], labels[:900], codes[i:i + 1, 900:], labels[900:], 16,
                                  config, [i], ["alone"], progress=False)
        for a, b in zip(both.parameters(), alone.parameters()):
            torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-5)
        assert accuracy(alone, codes[i:i + 1, 900:], labels[900:])[0] == pytest.approx(acc_both[i], abs=2e-3)
    assert min(acc_both) > 0.5  # it learned (chance: 0.1)


# The ops that read a tensor's value back to the host (on a GPU, the CPU then waits for the
# queue to drain): .item(), bool(t), .tolist() go through _local_scalar_dense; nonzero and
# masked_select have a shape that depends on the data.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}


def test_training_step_reads_nothing_back_to_the_host(digits):
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SYNCING_OPS:
                raise AssertionError(f"the training step called {name}, which waits for the device")
            return func(*args, **(kwargs or {}))

    x, _, _ = digits
    stack = TiedAutoencoder.stacked([seeded([784, 32, 16], s, linear_code=True) for s in (0, 1)])
    config = FitConfig(1, 32, 1e-3, warmup_epochs=0.5, precision="bfloat16")
    optimizer = make_optimizer(stack, config, capturable=True)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    step = training_step(stack, reconstruction_loss, optimizer, (shared(x[:256], 2),), "bfloat16",
                         fresh_noise, generators)
    before = stack.weights[0].detach().clone()
    idx = torch.stack([torch.randperm(256)[:32] for _ in range(2)])
    with NoHostSync():
        for k in range(3):
            losses = step(idx)
            optimizer.set_lr(1e-3 / (k + 1))  # as fit sets each step's rate
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert not torch.equal(before, stack.weights[0])  # it did step


def test_one_layer_denoiser_loss_decreases_on_real_digits(digits):
    x, noisy, _ = digits
    model = TiedAutoencoder([784, 32])
    result = fit_alone(model, reconstruction_loss, (noisy[:2500], x[:2500]), (noisy[2500:], x[2500:]),
                       FitConfig(epochs=5, batch_size=32, lr=1e-2))
    losses = [row["val_loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.best_val_loss == min(losses)


def test_best_epoch_weights_are_restored(digits):
    x, noisy, _ = digits
    model = TiedAutoencoder([784, 16])
    result = fit_alone(model, reconstruction_loss, (noisy[:1000], x[:1000]), (noisy[2500:], x[2500:]),
                       FitConfig(epochs=3, batch_size=100, lr=1e-2))
    with torch.no_grad():
        final = torch.mean((model(noisy[2500:]) - x[2500:]) ** 2).item()
    assert final == pytest.approx(result.best_val_loss, rel=1e-5)


def test_nan_loss_stops_with_epoch_and_hint():
    x = torch.rand(64, 10)
    x[3, 3] = math.nan
    model = TiedAutoencoder([10, 4])
    with pytest.raises(TrainingDiverged, match=r"epoch 1.*lower learning rate"):
        fit_alone(model, reconstruction_loss, (x, x), (x, x), FitConfig(2, 16, 1e-3), desc="stage x")


@pytest.mark.parametrize("centred", [False, True])
def test_resume_after_interruption_is_bit_identical(tmp_path, digits, centred):
    """Two stacked members, interrupted after epoch 2 and resumed from the checkpoint: the same bits."""
    x, noisy, _ = digits
    data = ((shared(noisy[:500], 2), shared(x[:500], 2)), (shared(noisy[2500:2700], 2), shared(x[2500:2700], 2)))
    config = FitConfig(epochs=3, batch_size=50, lr=3e-3, warmup_epochs=1)

    def fresh():
        return TiedAutoencoder.stacked([seeded([784, 16], 0), seeded([784, 16], 1)])

    def around_epoch(model):  # the centring offsets are recomputed every epoch, so resuming repeats them
        return (lambda: model.centered(noisy[:300])) if centred else None

    def run(model, **kwargs):
        return fit(model, reconstruction_loss, *data, config, seeds=[0, 1], desc=["a", "b"],
                   epoch_context=around_epoch(model), progress=False, **kwargs)

    reference = fresh()
    run(reference)

    class Killed(Exception):
        pass

    def kill_after_epoch_2(rows):
        if rows[0]["epoch"] == 2:
            raise Killed

    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(Killed):
        run(fresh(), on_epoch=kill_after_epoch_2, checkpoint=checkpoint)
    assert checkpoint.exists()  # epoch 1 was saved before the kill in epoch 2's callback
    resumed = fresh()
    results = run(resumed, checkpoint=checkpoint)
    assert [[row["epoch"] for row in result.history] for result in results] == [[1, 2, 3]] * 2
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_epoch_context_wraps_each_epochs_steps_and_not_validation(digits):
    x, noisy, _ = digits
    inside, calls = [False], []

    @contextlib.contextmanager
    def around_epoch():
        inside[0] = True
        yield
        inside[0] = False

    def loss(model, batch):
        calls.append(inside[0] if torch.is_grad_enabled() else ("val", inside[0]))
        return reconstruction_loss(model, batch)

    fit_alone(TiedAutoencoder([784, 16]), loss, (noisy[:400], x[:400]), (noisy[2500:2600], x[2500:2600]),
              FitConfig(2, 100, 1e-3), epoch_context=around_epoch)
    # 4 training steps inside the context, then validation (one batch) outside it; twice
    assert calls == [True] * 4 + [("val", False)] + [True] * 4 + [("val", False)]


def test_centred_fit_keeps_the_best_plain_model(digits):
    x, noisy, _ = digits
    model = seeded([784, 64, 32, 16], 0, gain=4.0, linear_code=True)
    model.center_biases(noisy[:1000])
    stack = TiedAutoencoder.stacked([model])
    result, = fit(stack, reconstruction_loss, (shared(noisy[:2000], 1), shared(x[:2000], 1)),
                  (shared(noisy[2500:], 1), shared(x[2500:], 1)), FitConfig(3, 100, 3e-3), seeds=[0], desc=["test"],
                  epoch_context=lambda: stack.centered(noisy[:1000]))
    assert stack._offsets is None
    plain = stack.unstacked()[0]
    with torch.no_grad():
        final = torch.mean((plain(noisy[2500:]) - x[2500:]) ** 2).item()
    assert final == pytest.approx(result.best_val_loss, rel=1e-5)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_bfloat16_autocast_trains_with_float32_weights_and_loss(digits):
    """precision: bfloat16 runs the matrix products in bfloat16 (CPU or CUDA); the parameters,
    optimizer state and loss stay float32, and it learns about as well as float32."""
    x, noisy, _ = digits
    data = ((noisy[:2000], x[:2000]), (noisy[2500:], x[2500:]))
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = seeded([784, 32], 0)
        result = fit_alone(model, reconstruction_loss, *data, FitConfig(3, 100, 1e-2, precision=precision),
                           desc=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[precision] = result.best_val_loss
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    stack = TiedAutoencoder.stacked([TiedAutoencoder([784, 32])])
    batch = (noisy[None, :4], x[None, :4])
    with autocast(torch.device("cpu"), "bfloat16"):
        assert stack(batch[0]).dtype == torch.bfloat16  # the products did run in bfloat16 ...
        assert reconstruction_loss(stack, batch).dtype == torch.float32  # ... the loss did not


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        autocast(torch.device("cpu"), "float16")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_as_named(schedule):
    """The learning rate at each step: linear warm-up over warmup_epochs, then the schedule."""
    from dae.train import _lr_factor

    steps_per_epoch = 10
    factor = _lr_factor(FitConfig(epochs=5, batch_size=1, lr=1.0, warmup_epochs=1, schedule=schedule),
                        steps_per_epoch)
    assert [factor(step) for step in range(10)] == pytest.approx([(step + 1) / 10 for step in range(10)])
    decay = [factor(step) for step in range(10, 51)]  # 40 steps after warm-up, and one past the end
    expected = {"constant": [1.0] * 41,
                "linear": [1 - i / 40 for i in range(40)] + [0.0],
                "cosine": [0.5 * (1 + math.cos(math.pi * i / 40)) for i in range(40)] + [0.0]}[schedule]
    assert decay == pytest.approx(expected, abs=1e-12)


def test_schedule_sets_the_learning_rate_of_every_epoch():
    """fit's history records the learning rate that the schedule gave at each epoch's end."""
    x = torch.rand(100, 10)
    rates = {}
    for schedule in ("cosine", "linear"):
        result = fit_alone(TiedAutoencoder([10, 4]), reconstruction_loss, (x, x), (x, x),
                           FitConfig(4, 10, 1e-2, schedule=schedule), desc=schedule, progress=False)
        rates[schedule] = [row["lr"] for row in result.history]
    assert rates["linear"] == pytest.approx([7.5e-3, 5e-3, 2.5e-3, 0.0])
    assert rates["cosine"] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3, 4)])


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        fit_alone(TiedAutoencoder([10, 4]), reconstruction_loss, (torch.rand(8, 10),) * 2, (torch.rand(8, 10),) * 2,
                  FitConfig(1, 4, 1e-2, schedule="step"), desc="x", progress=False)


class RecordingGraph:
    """A stand-in for torch.cuda.CUDAGraph on a CPU that records as CUDA's does: what runs inside
    `capture` has no effect (the model, optimizer and generators are put back), and `replay` runs
    the recorded step on GraphedStep's static index buffer, into the tensor the capture returned."""

    def __init__(self, stack, optimizer, graphed_step):
        self.stack, self.optimizer, self.graphed = stack, optimizer, graphed_step
        self.generators, self.captures, self.replays = [], 0, 0

    def register_generator_state(self, generator):
        self.generators.append(generator)

    @contextlib.contextmanager
    def capture(self, graph):
        saved = (copy.deepcopy(self.stack.state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                 [g.get_state() for g in graph.generators])
        yield
        self.stack.load_state_dict(saved[0])
        self.optimizer.load_state_dict(saved[1])
        for g, state in zip(graph.generators, saved[2]):
            g.set_state(state)
        graph.captures += 1

    def replay(self):
        self.replays += 1
        self.graphed.losses.copy_(self.graphed.step(self.graphed.static_idx))


def test_graphed_step_takes_exactly_the_eager_steps(digits):
    """GraphedStep (the CUDA path of `fit`) with a stand-in graph on a CPU: over two epochs of 5
    batches and a partial one, with capture anew each epoch, every batch is applied once, the
    partial one eagerly, each member's noise drawn from its registered generator; the weights and
    losses are the eager step's, bit for bit."""
    from dae.train import GraphedStep

    x, _, _ = digits
    config = FitConfig(2, 32, 1e-3)
    n, members = 180, 2  # 5 full batches of 32 and one of 20 per epoch

    def run(graphed: bool):
        stack = TiedAutoencoder.stacked([seeded([784, 32, 16], s, linear_code=True) for s in (0, 1)])
        optimizer = make_optimizer(stack, config, capturable=True)  # as fit makes it for graphs
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        step = training_step(stack, reconstruction_loss, optimizer, (shared(x[:n], members),), "float32",
                             fresh_noise, generators)
        recorder = None
        if graphed:
            recorder = RecordingGraph(stack, optimizer, None)
            step = GraphedStep(step, (members, config.batch_size), x.device, generators,
                               new_graph=lambda: recorder, capture=recorder.capture, side_stream=False)
            recorder.graphed = step
        losses = []
        for epoch in range(2):
            if graphed:
                step.reset()
            order = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(epoch + s))
                                 for s in range(members)])
            for start in range(0, n, config.batch_size):
                losses.append(step(order[:, start:start + config.batch_size]).clone())
                optimizer.set_lr(1e-3 / (2 + len(losses)))
        return stack, torch.stack(losses), recorder

    eager, eager_losses, _ = run(False)
    graphed, graphed_losses, recorder = run(True)
    # epoch 1: a warm-up step, then a capture and 4 replays; epoch 2: a capture and 5 replays;
    # the partial batch of each epoch eagerly
    assert recorder.captures == 2 and recorder.replays == 4 + 5
    assert len(recorder.generators) == 2 * 2
    assert torch.equal(graphed_losses, eager_losses)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        assert torch.equal(a, b)
