"""A stack of tied-weight autoencoder layers.

Encoder layer k: h_k = f(h_{k-1} W_kᵀ + b_k). Decoder layer k: ĥ_{k-1} = f(ĥ_k W_k + c_k), the
same W_k transposed (one parameter, two uses) with its own bias c_k. f is the hidden activation
(sigmoid or tanh); the output layer is always a sigmoid (pixels in [0, 1]); the code layer may
be linear (as in Hinton & Salakhutdinov 2006).

While training inside `centered`, each layer subtracts a fixed offset, the mean of its input,
before its matrix product (the centring trick); the biases absorb it, so the model computes the
same function and is saved in the plain form above.

`TiedAutoencoder.stacked(models)` trains M models of one architecture as one module: every
parameter gets a leading member dimension (weights [M, out, in]), inputs are [M, batch, in] and
each matrix product is one batched `baddbmm`, so M members cost the kernel launches of one.
`unstacked()` gives the plain models back; files and serving only ever see plain models.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Names as in dae.params.ACTIVATIONS: this file travels alone inside every logged MLflow model
# (dae/serving.py), so it imports nothing of dae; tests/test_params.py checks the two agree.
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}
# f⁻¹ of each activation, and how far from its bounds a mean may lie before inverting it.
INVERSES = {"sigmoid": (torch.logit, (1e-3, 1 - 1e-3)), "tanh": (torch.atanh, (-0.999, 0.999))}
# What each layer may apply: the hidden activations, plus the identity of a linear code layer.
LAYER_FUNCTIONS = ACTIVATIONS | {"linear": lambda x: x}


def affine(bias: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight + bias; per member (one batched product) when the weight is stacked [M, n, m]."""
    if weight.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(1), h, weight)
    return torch.addmm(bias, h, weight)


class TiedAutoencoder(nn.Module):
    def __init__(self, sizes: list[int], linear_code: bool = False, activation: str = "sigmoid",
                 output_sigmoid: bool = True) -> None:
        """`sizes` = [input, hidden_1, ..., code]; one tied layer per consecutive pair.

        `output_sigmoid`: the reconstruction of the input goes through a sigmoid (pixels); a
        layer pretrained on hidden codes reconstructs them with the hidden activation instead.
        """
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"need at least input and code size, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}")
        self.sizes = list(sizes)
        self.linear_code = linear_code
        self.activation = activation
        self.output_sigmoid = output_sigmoid
        pairs = list(zip(sizes[:-1], sizes[1:]))
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n_out, n_in)) for n_in, n_out in pairs)
        self.enc_biases = nn.ParameterList(nn.Parameter(torch.zeros(n_out)) for _, n_out in pairs)
        self.dec_biases = nn.ParameterList(nn.Parameter(torch.zeros(n_in)) for n_in, _ in pairs)
        # Inside `centered`: the mean input of every layer (the image, then each encoder output).
        self._offsets: list[torch.Tensor] | None = None
        self.members = 0  # 0: a plain model; M: M stacked members (see `stacked`)
        self.reset_parameters()

    @property
    def depth(self) -> int:
        return len(self.weights)

    def reset_parameters(self, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
        """Uniform Glorot init scaled by `gain` (Glorot & Bengio suggest 4 for sigmoid units)."""
        with torch.no_grad():
            for w, b, c in zip(self.weights, self.enc_biases, self.dec_biases):
                n_out, n_in = w.shape
                bound = gain * math.sqrt(6.0 / (n_in + n_out))
                w.copy_(torch.rand(w.shape, generator=generator) * 2 * bound - bound)
                b.zero_()
                c.zero_()

    @torch.no_grad()
    def center_biases(self, inputs: torch.Tensor) -> None:
        """Data-dependent bias init; the weights are left as they are.

        Encoder: b_k = −mean(h_{k−1}) W_kᵀ over `inputs`, so every unit's pre-activation has mean
        zero and starts in the steep range of its activation. Decoder: c_k is chosen so that each
        unit's mean pre-activation is f⁻¹(mean of the values it reconstructs). Why: with zero
        biases, the positive inputs (pixels, sigmoid codes ≈ 0.5) times large random weights shift
        whole units into saturation, and a randomly initialised deep sigmoid stack then learns very
        slowly. Call it after `reset_parameters`, on a sample of the training inputs.
        """
        h, means = inputs, [inputs.mean(0)]
        for k, (w, b) in enumerate(zip(self.weights, self.enc_biases)):
            pre = h @ w.t()
            b.copy_(-pre.mean(0))
            h = LAYER_FUNCTIONS[self._encoder_activation(k)](pre + b)
            means.append(h.mean(0))
        for k in reversed(range(self.depth)):
            pre = h @ self.weights[k]
            kind = self._decoder_activation(k)
            inverse, (lo, hi) = INVERSES[kind]
            self.dec_biases[k].copy_(inverse(means[k].clamp(lo, hi)) - pre.mean(0))
            h = LAYER_FUNCTIONS[kind](pre + self.dec_biases[k])

    @contextmanager
    def centered(self, inputs: torch.Tensor) -> Iterator[None]:
        """Train in the centred parametrisation; on exit the model is in its plain form again.

        Inside, encoder layer k computes f((h_{k−1} − μ_{k−1}) W_kᵀ + b′_k) and decoder layer k
        f((ĥ_k − μ_k) W_k + c′_k), where μ_k is the mean of the encoder's h_k over `inputs` (μ_0
        the mean input; ĥ_k, which reconstructs h_k, is centred on the same μ_k) and
        b′_k = b_k + μ_{k−1} W_kᵀ, c′_k = c_k + μ_k W_k, so the function does not change.
        Why: sigmoid outputs have a mean near 0.5, which couples the gradients of a layer's
        weights and of its bias and makes the loss badly conditioned; centring removes that
        coupling (Schraudolph 1998; Montavon & Müller 2012). The optimizer keeps its state:
        the parameters are updated in place.
        """
        if self._offsets is not None:
            raise RuntimeError("the model is already centred")
        with torch.no_grad():
            # A stacked model: every member's means over the same images ([N, in] broadcast).
            h = inputs.expand(self.members, *inputs.shape) if self.members and inputs.dim() == 2 else inputs
            offsets = [h.mean(-2, keepdim=True)]  # [1, in], or [M, 1, in] stacked
            for k in range(self.depth):
                h = LAYER_FUNCTIONS[self._encoder_activation(k)](affine(self.enc_biases[k], h, self.weights[k].mT))
                offsets.append(h.mean(-2, keepdim=True))
            self._shift_biases(offsets, +1)
        self._offsets = offsets
        try:
            yield
        finally:
            self._offsets = None
            with torch.no_grad():
                self._shift_biases(offsets, -1)

    def _shift_biases(self, offsets: list[torch.Tensor], sign: int) -> None:
        for k, w in enumerate(self.weights):  # (a vector, or one per member, times its matrix)
            self.enc_biases[k].add_((offsets[k] @ w.mT).squeeze(-2), alpha=sign)
            self.dec_biases[k].add_((offsets[k + 1] @ w).squeeze(-2), alpha=sign)

    # The layer rules, in one place for encode, decode and center_biases.
    def _encoder_activation(self, k: int) -> str:
        """Encoder layer k's activation: "linear" for a linear code layer, else the hidden one."""
        return "linear" if (self.linear_code and k == self.depth - 1) else self.activation

    def _decoder_activation(self, k: int) -> str:
        """Decoder layer k's activation: a sigmoid for pixels, else the hidden activation."""
        return "sigmoid" if (k == 0 and self.output_sigmoid) else self.activation

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for k, (w, b) in enumerate(zip(self.weights, self.enc_biases)):
            if self._offsets is not None:
                h = h - self._offsets[k]
            h = LAYER_FUNCTIONS[self._encoder_activation(k)](affine(b, h, w.mT))
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for k in reversed(range(self.depth)):
            if self._offsets is not None:
                h = h - self._offsets[k + 1]
            pre = affine(self.dec_biases[k], h, self.weights[k])
            h = LAYER_FUNCTIONS[self._decoder_activation(k)](pre)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @classmethod
    def stacked(cls, models: list["TiedAutoencoder"]) -> "TiedAutoencoder":
        """M plain models of one architecture as one stacked model (copies of their parameters)."""
        archs = [model.arch() for model in models]
        if not models or any(arch != archs[0] for arch in archs) or any(m.members for m in models):
            raise ValueError(f"can only stack plain models of one architecture, got {archs}")
        stack = cls.from_arch(archs[0])
        stack.members = len(models)
        with torch.no_grad():
            for name in ("weights", "enc_biases", "dec_biases"):
                for k, param in enumerate(getattr(stack, name)):
                    param.data = torch.stack([getattr(m, name)[k].detach() for m in models]).to(param.device)
        return stack.to(models[0].weights[0].device)

    def unstacked(self) -> list["TiedAutoencoder"]:
        """The members of a stacked model as plain models (copies), on the CPU."""
        if not self.members:
            raise ValueError("not a stacked model")
        plain = []
        for i in range(self.members):
            model = TiedAutoencoder.from_arch(self.arch())
            model.load_state_dict({key: value[i].detach().cpu().clone() for key, value in self.state_dict().items()})
            plain.append(model)
        return plain

    def arch(self) -> dict:
        return {"sizes": self.sizes, "linear_code": self.linear_code, "activation": self.activation,
                "output_sigmoid": self.output_sigmoid}

    @classmethod
    def from_arch(cls, arch: dict) -> "TiedAutoencoder":
        return cls(arch["sizes"], arch["linear_code"], arch["activation"], arch["output_sigmoid"])

    def layer(self, k: int) -> "TiedAutoencoder":
        """A one-layer autoencoder sharing layer k's (0-based) parameters with this stack."""
        single = TiedAutoencoder(self.sizes[k:k + 2], self.linear_code and k == self.depth - 1,
                                 self.activation, self.output_sigmoid and k == 0)
        single.weights[0] = self.weights[k]
        single.enc_biases[0] = self.enc_biases[k]
        single.dec_biases[0] = self.dec_biases[k]
        return single

    @classmethod
    def stack(cls, layers: list["TiedAutoencoder"]) -> "TiedAutoencoder":
        """Stack one-layer autoencoders (copies of their parameters) into a deep one."""
        sizes = [layers[0].sizes[0]] + [layer.sizes[1] for layer in layers]
        for prev, nxt in zip(layers[:-1], layers[1:]):
            if prev.sizes[1] != nxt.sizes[0]:
                raise ValueError(f"cannot stack layers of sizes {prev.sizes} and {nxt.sizes}")
        deep = cls(sizes, layers[-1].linear_code, layers[0].activation, layers[0].output_sigmoid)
        with torch.no_grad():
            for k, layer in enumerate(layers):
                deep.weights[k].copy_(layer.weights[0])
                deep.enc_biases[k].copy_(layer.enc_biases[0])
                deep.dec_biases[k].copy_(layer.dec_biases[0])
        return deep
