import copy
import math
from pathlib import Path

import pytest
import yaml

from dae.params import ParamError, load, model_arch, section_flat, validate

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["data", "noise", "arch", "pretrain", "finetune", "classifier", "figures", "seeds", "device"]


@pytest.fixture()
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repository_params_are_valid(params):
    validate(params, SECTIONS)
    assert load(ROOT / "params.yaml")["device"] == params["device"]
    for sections in (["arch"], ["noise"]):
        validate(params, sections)


@pytest.mark.parametrize("key, value, message", [
    ("noise.level", -0.1, "noise.level: must be a finite number >= 0"),
    ("noise.level", math.nan, "noise.level: must be a finite number"),
    ("noise.type", "speckle", "noise.type: must be one of"),
    ("data.dataset", "cifar", "data.dataset: must be one of"),
    ("device", "tpu", "device: must be one of"),
    ("arch.hidden", [512, 256.5, 128, 64, 64, 64, 64], "arch.hidden: must be a non-empty list of 7"),
    ("arch.hidden", [512, 0, 128, 64, 64, 64, 64], "arch.hidden"),
    ("arch.hidden", [512, 256], "arch.hidden: must be a non-empty list of 7"),
    ("arch.bottleneck", 1000, "arch.bottleneck: 1000 is wider"),
    ("arch.bottleneck", -3, "arch.bottleneck: must be an integer >= 1"),
    ("finetune.epochs", 0, "finetune.epochs: must be an integer >= 1"),
    ("pretrain.batch_size", -8, "pretrain.batch_size: must be an integer >= 1"),
    ("classifier.lr", 0, "classifier.lr: must be a finite number > 0"),
    ("finetune.lr", -1e-3, "finetune.lr: must be a finite number > 0"),
    ("seeds", [0, 0], "seeds: must not repeat"),
    ("finetune.precision", "float16", "finetune.precision: must be one of ['float32', 'bfloat16']"),
    ("finetune.epochs", {"shallow": 10, "greedy_ft": 40}, "finetune.epochs: a mapping must name exactly"),
    ("finetune.epochs", {"shallow": 10, "random_ft": 0, "greedy_ft": 40},
     "finetune.epochs.random_ft: must be an integer >= 1"),
    ("seeds", [], "seeds: must be a non-empty list"),
    ("finetune.center", "yes", "finetune.center: must be one of [True, False]"),
    ("finetune.schedule", "step", "finetune.schedule: must be one of ['cosine', 'linear', 'constant']"),
])
def test_bad_values_name_the_key_and_the_rule(params, key, value, message):
    bad = copy.deepcopy(params)
    node = bad
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ParamError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(bad, SECTIONS)


def test_masking_fraction_must_be_a_fraction(params):
    params["noise"].update(type="masking", level=1.5)
    with pytest.raises(ParamError, match=r"noise.level: a masking fraction must be in \[0, 1\]"):
        validate(params, ["noise"])


def test_missing_key_is_named(params):
    del params["finetune"]["lr"]
    with pytest.raises(ParamError, match="finetune.lr: missing"):
        validate(params, ["finetune"])


def test_only_requested_sections_are_checked(params):
    params["classifier"]["epochs"] = -1
    validate(params, ["noise"])  # a stage that does not read classifier is not blocked by it


def test_model_arch(params):
    assert model_arch(params, "shallow")["sizes"] == [784, params["arch"]["bottleneck"]]
    deep = model_arch(params, "greedy_ft")["sizes"]
    assert len(deep) == 9 and deep[-1] == params["arch"]["bottleneck"]
    with pytest.raises(ParamError, match="unknown model"):
        model_arch(params, "vae")


def test_finetune_epochs_per_model_or_one_for_all(params):
    from dae.train import FitConfig

    def fit_config(params, section, model):
        return FitConfig.from_section(params[section], model)

    params["finetune"]["epochs"] = 7
    assert {fit_config(params, "finetune", m).epochs for m in ("shallow", "random_ft", "greedy_ft")} == {7}
    params["finetune"]["epochs"] = {"shallow": 3, "random_ft": 5, "greedy_ft": 6}
    validate(params, ["finetune"])
    assert [fit_config(params, "finetune", m).epochs for m in ("shallow", "random_ft", "greedy_ft")] == [3, 5, 6]
    assert fit_config(params, "finetune", "shallow").precision == params["finetune"]["precision"]
    sections = ["pretrain", "finetune", "classifier"]
    assert [fit_config(params, s, "greedy_ft").schedule for s in sections] == [params[s]["schedule"] for s in sections]
    flat = section_flat(params, ["finetune"])
    assert flat["finetune.epochs.random_ft"] == 5 and "finetune.epochs" not in flat  # one MLflow param each


def test_each_allowed_value_list_is_the_one_its_module_implements():
    """dae.model travels alone inside every logged MLflow model, so it names its activations itself."""
    from dae import model, params as params_mod

    assert tuple(model.ACTIVATIONS) == params_mod.ACTIVATIONS


def test_dvc_yaml_has_one_pretrain_layer_stage_per_deep_layer():
    import yaml

    from dae.params import DEEP_LAYERS

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    assert list(stages["pretrain_layer"]["foreach"]) == [str(k) for k in range(1, DEEP_LAYERS + 1)]
