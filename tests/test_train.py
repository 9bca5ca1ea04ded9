import contextlib
import math

import pytest
import torch

from dae.model import TiedAutoencoder
from dae.train import (FitConfig, TrainingDiverged, autocast, classification_loss, fit, make_optimizer,
                       reconstruction_loss)


@pytest.fixture(scope="module")
def digits(mnist_raw):
    from dae.data import load_split

    images, labels = load_split(mnist_raw, "train")
    x = torch.from_numpy(images[:3000].copy()).float() / 255
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, noisy, torch.from_numpy(labels[:3000].copy())


def test_one_layer_denoiser_loss_decreases_on_real_digits(digits):
    x, noisy, _ = digits
    model = TiedAutoencoder([784, 32])
    result = fit(model, reconstruction_loss, (noisy[:2500], x[:2500]), (noisy[2500:], x[2500:]),
                 FitConfig(epochs=5, batch_size=32, lr=1e-2), seed=0, desc="test")
    losses = [row["val_loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.best_val_loss == min(losses)


def test_best_epoch_weights_are_restored(digits):
    x, noisy, _ = digits
    model = TiedAutoencoder([784, 16])
    result = fit(model, reconstruction_loss, (noisy[:1000], x[:1000]), (noisy[2500:], x[2500:]),
                 FitConfig(epochs=3, batch_size=100, lr=1e-2), seed=0, desc="test")
    with torch.no_grad():
        final = torch.mean((model(noisy[2500:]) - x[2500:]) ** 2).item()
    assert final == pytest.approx(result.best_val_loss, rel=1e-5)


def test_nan_loss_stops_with_epoch_and_hint():
    x = torch.rand(64, 10)
    x[3, 3] = math.nan
    model = TiedAutoencoder([10, 4])
    with pytest.raises(TrainingDiverged, match=r"epoch 1.*lower learning rate"):
        fit(model, reconstruction_loss, (x, x), (x, x), FitConfig(2, 16, 1e-3), seed=0, desc="stage x")


@pytest.mark.parametrize("centred", [False, True])
def test_resume_after_interruption_is_bit_identical(tmp_path, digits, centred):
    x, noisy, _ = digits
    data = ((noisy[:500], x[:500]), (noisy[2500:2700], x[2500:2700]))
    config = FitConfig(epochs=3, batch_size=50, lr=3e-3, warmup_epochs=1)

    def fresh():
        torch.manual_seed(0)
        model = TiedAutoencoder([784, 16])
        model.reset_parameters(1.0, torch.Generator().manual_seed(0))
        return model

    def around_epoch(model):  # the centring offsets are recomputed every epoch, so resuming repeats them
        return (lambda: model.centered(noisy[:300])) if centred else None

    reference = fresh()
    fit(reference, reconstruction_loss, *data, config, seed=0, desc="ref", epoch_context=around_epoch(reference))

    class Killed(Exception):
        pass

    def kill_after_epoch_2(row):
        if row["epoch"] == 2:
            raise Killed

    checkpoint = tmp_path / "ckpt.pt"
    interrupted = fresh()
    with pytest.raises(Killed):
        fit(interrupted, reconstruction_loss, *data, config, seed=0, desc="run", on_epoch=kill_after_epoch_2,
            checkpoint=checkpoint, epoch_context=around_epoch(interrupted))
    assert checkpoint.exists()  # epoch 1 was saved before the kill in epoch 2's callback
    resumed = fresh()
    result = fit(resumed, reconstruction_loss, *data, config, seed=0, desc="run", checkpoint=checkpoint,
                 epoch_context=around_epoch(resumed))
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
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

    model = TiedAutoencoder([784, 16])
    fit(model, loss, (noisy[:400], x[:400]), (noisy[2500:2600], x[2500:2600]), FitConfig(2, 100, 1e-3),
        seed=0, desc="test", epoch_context=around_epoch)
    # 4 training steps inside the context, then validation (one batch) outside it; twice
    assert calls == [True] * 4 + [("val", False)] + [True] * 4 + [("val", False)]


def test_centred_fit_keeps_the_best_plain_model(digits):
    x, noisy, _ = digits
    torch.manual_seed(0)
    model = TiedAutoencoder([784, 64, 32, 16], linear_code=True)
    model.reset_parameters(4.0, torch.Generator().manual_seed(0))
    model.center_biases(noisy[:1000])
    result = fit(model, reconstruction_loss, (noisy[:2000], x[:2000]), (noisy[2500:], x[2500:]),
                 FitConfig(3, 100, 3e-3), seed=0, desc="test",
                 epoch_context=lambda: model.centered(noisy[:1000]))
    assert model._offsets is None
    with torch.no_grad():
        final = torch.mean((model(noisy[2500:]) - x[2500:]) ** 2).item()
    assert final == pytest.approx(result.best_val_loss, rel=1e-5)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_classifier_training_through_the_same_loop():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 5, generator=g) * 5
    labels = torch.randint(0, 10, (2000,), generator=g)
    points = centers[labels] + torch.randn(2000, 5, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fit(model, classification_loss, (points[:1500], labels[:1500]), (points[1500:], labels[1500:]),
        FitConfig(5, 64, 1e-2), seed=0, desc="clf")
    accuracy = (model(points[1500:]).argmax(1) == labels[1500:]).float().mean()
    assert accuracy > 0.9


def test_fused_adam_takes_the_same_steps_as_plain_adam(digits):
    # The fit loop uses the fused kernel for speed; it must not change the training itself.
    config = FitConfig(1, 64, 3e-3)
    models = [TiedAutoencoder([784, 32]) for _ in range(2)]
    models[0].reset_parameters(1.0, torch.Generator().manual_seed(0))
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0].weights[0].detach().clone()
    fused = make_optimizer(models[0], config)
    plain = torch.optim.Adam(models[1].parameters(), lr=config.lr)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    clean, noisy, _ = digits
    batch = (noisy[:64], clean[:64])
    for _ in range(5):
        for model, optimizer in zip(models, (fused, plain)):
            loss = reconstruction_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(models[0].weights[0], initial)  # it did train


def test_bfloat16_autocast_trains_with_float32_weights_and_loss(digits):
    """precision: bfloat16 runs the matrix products in bfloat16 (CPU or CUDA); the parameters,
    optimizer state and loss stay float32, and it learns about as well as float32."""
    x, noisy, _ = digits
    data = ((noisy[:2000], x[:2000]), (noisy[2500:], x[2500:]))
    losses = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = TiedAutoencoder([784, 32])
        model.reset_parameters(1.0, torch.Generator().manual_seed(0))
        result = fit(model, reconstruction_loss, *data, FitConfig(3, 100, 1e-2, precision=precision), seed=0,
                     desc=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[precision] = result.best_val_loss
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    model = TiedAutoencoder([784, 32])
    with autocast(torch.device("cpu"), "bfloat16"):
        assert model(noisy[:4]).dtype == torch.bfloat16  # the products did run in bfloat16 ...
        assert reconstruction_loss(model, (noisy[:4], x[:4])).dtype == torch.float32  # ... the loss did not


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
        model = TiedAutoencoder([10, 4])
        result = fit(model, reconstruction_loss, (x, x), (x, x), FitConfig(4, 10, 1e-2, schedule=schedule),
                     seed=0, desc=schedule, progress=False)
        rates[schedule] = [row["lr"] for row in result.history]
    assert rates["linear"] == pytest.approx([7.5e-3, 5e-3, 2.5e-3, 0.0])
    assert rates["cosine"] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3, 4)])


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        fit(TiedAutoencoder([10, 4]), reconstruction_loss, (torch.rand(8, 10),) * 2, (torch.rand(8, 10),) * 2,
            FitConfig(1, 4, 1e-2, schedule="step"), seed=0, desc="x", progress=False)
