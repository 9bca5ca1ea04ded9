"""Load params.yaml and validate it before any work starts.

Every error names the key and what is allowed, e.g. "noise.level: must be a finite number
>= 0, got nan".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import yaml

MODELS = ("shallow", "greedy", "random_ft", "greedy_ft")
DEEP_LAYERS = 8  # dvc.yaml has one pretrain_layer stage per layer of the deep encoder (a test checks)
# The allowed values, defined here once; the modules that implement them import them from here.
NOISE_TYPES = ("gaussian", "masking", "salt_and_pepper")        # dae.noise.corrupt
ACTIVATIONS = ("sigmoid", "tanh")                                # dae.model (a test checks)
SCHEDULES = ("cosine", "linear", "constant")                     # dae.train: after the warm-up
PRECISIONS = ("float32", "bfloat16")                             # dae.train.autocast
DEVICES = ("auto", "cpu", "cuda")                                # dae.device.select_device


class ParamError(ValueError):
    """params.yaml holds a missing or invalid value."""


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable:
    def check(key: str, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
        if not ok:
            lo_txt = "" if lo is None else (f" > {lo}" if lo_open else f" >= {lo}")
            hi_txt = "" if hi is None else f" and <= {hi}"
            raise ParamError(f"{key}: must be a finite number{lo_txt}{hi_txt}, got {value!r}")
    return check


def _int(lo: int = 1, optional: bool = False) -> Callable:
    def check(key: str, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ParamError(f"{key}: must be an integer >= {lo}{' or null' if optional else ''}, "
                             f"got {value!r}")
    return check


def _choice(*allowed: Any) -> Callable:
    def check(key: str, value: Any) -> None:
        if value not in allowed:
            raise ParamError(f"{key}: must be one of {list(allowed)}, got {value!r}")
    return check


def _int_list(length: int | None = None, lo: int = 1) -> Callable:
    def check(key: str, value: Any) -> None:
        if (not isinstance(value, list) or (length is not None and len(value) != length)
                or not value or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in value)):
            size = f"{length} " if length else ""
            raise ParamError(f"{key}: must be a non-empty list of {size}integers >= {lo}, got {value!r}")
    return check


TRAINED_MODELS = ("shallow", "random_ft", "greedy_ft")  # the models finetune trains (greedy: none)


def _epochs_per_model(key: str, value: Any) -> None:
    """An integer for every trained model, or a mapping {shallow, random_ft, greedy_ft: int}."""
    if isinstance(value, dict):
        if set(value) != set(TRAINED_MODELS):
            raise ParamError(f"{key}: a mapping must name exactly {list(TRAINED_MODELS)}, got {sorted(value)}")
        for model, epochs in value.items():
            _int(1)(f"{key}.{model}", epochs)
    else:
        _int(1)(key, value)


def _fit_schema(section: str, epochs: Callable | None = None) -> dict[str, Callable]:
    return {f"{section}.epochs": epochs or _int(1), f"{section}.batch_size": _int(1),
            f"{section}.lr": _number(0, lo_open=True), f"{section}.weight_decay": _number(0),
            f"{section}.warmup_epochs": _number(0), f"{section}.schedule": _choice(*SCHEDULES),
            f"{section}.precision": _choice(*PRECISIONS)}


SCHEMA: dict[str, Callable] = {
    "data.dataset": _choice("mnist", "fashion-mnist"),
    "data.val_size": _int(1),
    "data.split_seed": _int(0),
    "data.train_limit": _int(1, optional=True),
    "data.test_limit": _int(1, optional=True),
    "noise.type": _choice(*NOISE_TYPES),
    "noise.level": _number(0),
    "noise.clip": _choice(True, False),
    "noise.seed": _int(0),
    "arch.hidden": _int_list(DEEP_LAYERS - 1),
    "arch.bottleneck": _int(1),
    "arch.linear_code": _choice(True, False),
    "arch.activation": _choice(*ACTIVATIONS),
    **_fit_schema("pretrain"),
    "pretrain.init_gain": _number(0, lo_open=True),
    **_fit_schema("finetune", _epochs_per_model),
    "finetune.init_gain": _number(0, lo_open=True),
    "finetune.bias_init": _choice("data_mean", "zero"),
    "finetune.fresh_noise": _choice(True, False),
    "finetune.center": _choice(True, False),
    "classifier.hidden": _int(1),
    **_fit_schema("classifier"),
    "figures.n_digits": _int(1),
    "figures.tsne_points": _int(10),
    "seeds": _int_list(lo=0),
    "device": _choice(*DEVICES),
}


def _get(params: dict, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamError(f"{key}: missing from params.yaml")
        node = node[part]
    return node


def validate(params: dict, sections: list[str]) -> dict:
    """Check every key of the given top-level sections; cross-field rules too. Returns params."""
    for key, check in SCHEMA.items():
        if key.split(".")[0] in sections:
            check(key, _get(params, key))
    if "noise" in sections:
        level = params["noise"]["level"]
        if params["noise"]["type"] in ("masking", "salt_and_pepper") and not 0 <= level <= 1:
            raise ParamError(f"noise.level: a {params['noise']['type']} fraction must be in [0, 1], "
                             f"got {level!r}")
    if "arch" in sections:
        hidden, bottleneck = params["arch"]["hidden"], params["arch"]["bottleneck"]
        if bottleneck > min(hidden):
            raise ParamError(f"arch.bottleneck: {bottleneck} is wider than the narrowest hidden layer "
                             f"in arch.hidden {hidden}; a bottleneck must be the narrowest layer")
    if "seeds" in sections and len(set(params["seeds"])) != len(params["seeds"]):
        raise ParamError(f"seeds: must not repeat a seed, got {params['seeds']}")
    return params


def load(path: str | Path = "params.yaml", sections: list[str] | None = None) -> dict:
    """Read params.yaml and validate `sections` (all of them if None)."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamError(f"{path} not found (run from the repository root)") from exc
    except yaml.YAMLError as exc:
        raise ParamError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ParamError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    if sections is None:
        sections = sorted({key.split(".")[0] for key in SCHEMA})
    return validate(params, sections)


def deep_sizes(params: dict) -> list[int]:
    """[784, hidden..., bottleneck]: the layer sizes of the 8+8 models."""
    return [784, *params["arch"]["hidden"], params["arch"]["bottleneck"]]


def model_arch(params: dict, model: str) -> dict:
    """The TiedAutoencoder architecture of one of the four models (see dae.model.from_arch)."""
    if model not in MODELS:
        raise ParamError(f"unknown model {model!r}; choose one of {list(MODELS)}")
    if model != "shallow":
        return pretrained_arch(params, DEEP_LAYERS)
    return {"sizes": [784, params["arch"]["bottleneck"]], "linear_code": params["arch"]["linear_code"],
            "activation": params["arch"]["activation"], "output_sigmoid": True}


def pretrained_arch(params: dict, layers: int) -> dict:
    """The architecture of the pretrained stack of the first `layers` layers of the deep encoder, as
    pretrain_layer's checkpoint of layer `layers` holds it; the code layer is linear with
    arch.linear_code, and the stack reconstructs pixels."""
    return {"sizes": deep_sizes(params)[:layers + 1],
            "linear_code": params["arch"]["linear_code"] and layers == DEEP_LAYERS,
            "activation": params["arch"]["activation"], "output_sigmoid": True}


def section_flat(params: dict, sections: list[str]) -> dict[str, Any]:
    """{"noise.level": 0.3, "finetune.epochs.shallow": 20, ...} for the given sections: what a
    stage logs to MLflow (nested mappings flattened, so each value is one param)."""
    def flatten(prefix: str, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}", sub).items()}
        return {prefix: value}

    return {k: v for section in sections for k, v in flatten(section, params[section]).items()}
