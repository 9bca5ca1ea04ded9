import pytest
import torch

from dae.model import TiedAutoencoder


def test_decoder_uses_the_encoder_weights_transposed():
    model = TiedAutoencoder([784, 64, 16])
    # One weight matrix per layer, used twice: parameters = W + encoder bias + decoder bias.
    expected = sum(i * o + o + i for i, o in [(784, 64), (64, 16)])
    assert sum(p.numel() for p in model.parameters()) == expected
    x = torch.rand(5, 784)
    before = model(x)
    with torch.no_grad():
        model.weights[1].mul_(2.0)  # changes the encoder AND the decoder
    code_change = (model.encode(x) - model.encode(x)).abs().sum()
    assert code_change == 0
    assert not torch.allclose(model(x), before)


def test_gradient_reaches_the_tied_weight_from_both_sides():
    model = TiedAutoencoder([10, 4], linear_code=True)
    x = torch.rand(3, 10)
    model.decode(torch.rand(3, 4)).sum().backward()
    grad_from_decoder = model.weights[0].grad.clone()
    assert grad_from_decoder.abs().sum() > 0
    model.zero_grad()
    model.encode(x).sum().backward()
    assert model.weights[0].grad.abs().sum() > 0


def test_layer_view_shares_storage_and_stack_copies():
    deep = TiedAutoencoder([784, 32, 8])
    layer = deep.layer(1)
    assert layer.weights[0].data_ptr() == deep.weights[1].data_ptr()
    assert layer.sizes == [32, 8] and not layer.output_sigmoid
    rebuilt = TiedAutoencoder.stack([deep.layer(0), deep.layer(1)])
    x = torch.rand(4, 784)
    assert torch.allclose(rebuilt(x), deep(x))
    assert rebuilt.weights[0].data_ptr() != deep.weights[0].data_ptr()


def test_shapes_and_ranges():
    model = TiedAutoencoder([784, 50, 20, 2], linear_code=True, activation="tanh")
    x = torch.rand(7, 784)
    z = model.encode(x)
    assert z.shape == (7, 2)
    out = model(x)
    assert out.shape == (7, 784) and out.min() >= 0 and out.max() <= 1


def test_arch_round_trip_and_seeded_init():
    model = TiedAutoencoder([784, 30], linear_code=True)
    clone = TiedAutoencoder.from_arch(model.arch())
    model.reset_parameters(4.0, torch.Generator().manual_seed(3))
    clone.reset_parameters(4.0, torch.Generator().manual_seed(3))
    assert torch.equal(model.weights[0], clone.weights[0])
    bound = 4.0 * (6 / (784 + 30)) ** 0.5
    assert model.weights[0].abs().max() <= bound


def _pre_activations(model: TiedAutoencoder, x: torch.Tensor) -> tuple[list, list]:
    """The pre-activations of every encoder and decoder unit (decoder listed top to bottom)."""
    enc, dec, h = [], [], x
    for k in range(model.depth):
        pre = h @ model.weights[k].t() + model.enc_biases[k]
        enc.append(pre)
        h = pre if (model.linear_code and k == model.depth - 1) else torch.sigmoid(pre)
    targets = [x] + [torch.sigmoid(p) for p in enc[:-1]]
    for k in reversed(range(model.depth)):
        pre = h @ model.weights[k] + model.dec_biases[k]
        dec.append((pre, targets[k]))
        h = torch.sigmoid(pre)
    return enc, dec


def test_center_biases_centres_encoder_units_and_matches_decoder_means():
    torch.manual_seed(0)
    x = (torch.rand(2000, 40) < 0.2).float() * torch.rand(2000, 40)  # sparse, positive, like pixels
    model = TiedAutoencoder([40, 24, 16, 4], linear_code=True)
    model.reset_parameters(4.0, torch.Generator().manual_seed(1))
    weights = [w.detach().clone() for w in model.weights]
    enc_before, _ = _pre_activations(model, x)
    assert max(p.mean(0).abs().max() for p in enc_before) > 0.5  # zero biases: units are off-centre
    model.center_biases(x)
    with torch.no_grad():
        enc, dec = _pre_activations(model, x)
    for pre in enc:
        torch.testing.assert_close(pre.mean(0), torch.zeros(pre.shape[1]), atol=1e-4, rtol=0)
    for pre, target in dec:  # each decoder unit's mean pre-activation is logit(mean target)
        expected = torch.logit(target.mean(0).clamp(1e-3, 1 - 1e-3))
        torch.testing.assert_close(pre.mean(0), expected, atol=1e-4, rtol=0)
    assert all(torch.equal(w, before) for w, before in zip(model.weights, weights))


def test_centered_keeps_the_function_and_returns_the_plain_parameters():
    torch.manual_seed(0)
    x = (torch.rand(500, 40) < 0.2).float() * torch.rand(500, 40)
    model = TiedAutoencoder([40, 24, 16, 4], linear_code=True)
    model.reset_parameters(4.0, torch.Generator().manual_seed(1))
    model.center_biases(x)
    plain = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        before = model(x)
        with model.centered(x):
            inside = model(x)
            # the biases now hold the offsets: b′ = b + μWᵀ, and the first offset is the mean input
            torch.testing.assert_close(model.enc_biases[0], plain["enc_biases.0"] + x.mean(0) @ plain["weights.0"].t())
        after = model(x)
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, plain[name], atol=1e-6, rtol=0)
    assert list(model.state_dict()) == [f"{kind}.{k}" for kind in ("weights", "enc_biases", "dec_biases")
                                        for k in range(3)]  # saved models stay plain


def test_centered_changes_the_gradient_step_and_restores_on_error():
    torch.manual_seed(0)
    x = torch.rand(256, 20)
    model = TiedAutoencoder([20, 12, 6])

    def weight_grad(centered: bool) -> torch.Tensor:
        model.zero_grad()
        if centered:
            with model.centered(x):
                torch.mean((model(x) - x) ** 2).backward()
        else:
            torch.mean((model(x) - x) ** 2).backward()
        return model.weights[0].grad.clone()

    # Same function, other coordinates: the weights' gradient no longer carries the mean input.
    assert not torch.allclose(weight_grad(True), weight_grad(False), atol=1e-6)
    plain = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="already centred"):
        with model.centered(x):
            with model.centered(x):
                pass
    for p, q in zip(model.parameters(), plain):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert model._offsets is None


def test_stacked_members_compute_what_each_plain_model_computes():
    """A stack of M models: member i's encode, decode and centred parameters are model i's, and
    unstacked() gives the plain models back."""
    models = []
    for seed in range(3):
        model = TiedAutoencoder([20, 12, 6], linear_code=True)
        model.reset_parameters(4.0, torch.Generator().manual_seed(seed))
        models.append(model)
    stack = TiedAutoencoder.stacked(models)
    assert stack.members == 3 and stack.weights[0].shape == (3, 12, 20)
    x = torch.rand(3, 7, 20)
    out = stack(x)
    for i, model in enumerate(models):
        torch.testing.assert_close(out[i], model(x[i]))
        torch.testing.assert_close(stack.encode(x)[i], model.encode(x[i]))
    inputs = torch.rand(50, 20)
    with stack.centered(inputs):  # the same function inside, per member
        torch.testing.assert_close(stack(x), out)
    for plain, model in zip(stack.unstacked(), models):
        assert plain.members == 0 and plain.arch() == model.arch()
        for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
            torch.testing.assert_close(a, b)


def test_only_plain_models_of_one_architecture_stack():
    with pytest.raises(ValueError, match="one architecture"):
        TiedAutoencoder.stacked([TiedAutoencoder([20, 6]), TiedAutoencoder([20, 8])])
    with pytest.raises(ValueError, match="not a stacked model"):
        TiedAutoencoder([20, 6]).unstacked()
