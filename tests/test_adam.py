"""dae/adam.py: PyTorch's fused Adam kernel without torch.optim, bit for bit what torch.optim gives."""
import subprocess
import sys

import pytest
import torch

from dae.adam import Adam


def stepped(make_optimizer, steps: int = 6, weight_decay: float = 0.0) -> list[torch.Tensor]:
    """Parameters of a small regression after `steps` Adam steps (the same data and init each time)."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 8, 5, generator=g)), torch.nn.Parameter(torch.zeros(3, 5))
    x, y = torch.randn(3, 64, 8, generator=g), torch.randn(3, 64, 5, generator=g)
    optimizer = make_optimizer([w, b])
    for k in range(steps):
        if hasattr(optimizer, "set_lr"):
            optimizer.set_lr(1e-2 / (1 + k))
        else:
            optimizer.param_groups[0]["lr"] = 1e-2 / (1 + k)
        loss = ((torch.baddbmm(b.unsqueeze(1), x, w) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [w.detach(), b.detach()]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_same_bits_as_torch_fused_adam(weight_decay):
    ours = stepped(lambda p: Adam(p, lr=1e-2, weight_decay=weight_decay))
    torchs = stepped(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=weight_decay, fused=True))
    for a, b in zip(ours, torchs):
        assert torch.equal(a, b)


def test_close_to_plain_adam_and_capturable_form():
    """The unfused textbook Adam (float tolerance), and the capturable form with its learning rate
    as a tensor filled in place (the CUDA-graph path) takes the same steps."""
    ours = stepped(lambda p: Adam(p, lr=1e-2))
    plain = stepped(lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False))
    capturable = stepped(lambda p: Adam(p, lr=1e-2, capturable=True))
    for a, b, c in zip(ours, plain, capturable):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    def run(interrupt: bool):
        g = torch.Generator().manual_seed(1)
        w = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        optimizer = Adam([w], lr=1e-2)
        for k in range(6):
            if interrupt and k == 3:
                saved = optimizer.state_dict()
                optimizer = Adam([w], lr=5.0)  # a fresh one, as after a restart
                optimizer.load_state_dict(saved)
            (w ** 3).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return w.detach()

    assert torch.equal(run(False), run(True))


def test_building_and_stepping_does_not_import_the_compiler():
    """torch.optim imports torch._dynamo (~1 s, ~150 MB a process); this Adam does not."""
    code = ("import sys, torch; from dae.adam import Adam; p = torch.nn.Parameter(torch.ones(3)); "
            "o = Adam([p], lr=0.1); p.sum().backward(); o.step(); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_parameters_must_share_one_device():
    with pytest.raises(ValueError, match="one CPU or CUDA device"):
        Adam([], lr=0.1)
