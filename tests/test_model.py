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
