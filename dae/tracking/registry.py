"""Trained denoisers as MLflow models (dae/serving.py, models from code) and their registry versions."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The registry alias of the version from the workspace's latest `dvc repro` (queued and temporary
# experiments register versions too, but never move it).
CURRENT_ALIAS = "current"
SERVING_CODE = Path(__file__).parents[1] / "serving.py"   # the pyfunc model
MODEL_CODE = Path(__file__).parents[1] / "model.py"       # travels with it as dae_tied_autoencoder.py


def registered_model_name(dataset: str, model: str) -> str:
    """The Model Registry name of one of the four models: `dae-mnist-greedy_ft`."""
    return f"dae-{dataset}-{model}"


def log_model(mlflow: Any, name: str, weights: dict, metrics: dict[str, float], input_example: Any,
              tags: dict[str, str]) -> str:
    """Log a trained denoiser as an MLflow model of the active run, with its signature, an input
    example, pinned requirements and `metrics` attached; returns its models:/ URI."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    # No input schema: MLflow would enforce it before the model's own checks (dae/serving.py), and
    # answer a wrong width or an empty batch with an echo of the input; serving.py says what it takes.
    signature = ModelSignature(
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),  # 784, or the code size
        params=ParamSchema([ParamSpec("output", "string", "reconstruction")]))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(weights, Path(tmp) / "weights.pt")
        code = Path(tmp) / "dae_tied_autoencoder.py"
        code.write_text(MODEL_CODE.read_text())
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(SERVING_CODE), artifacts={"weights": str(Path(tmp) / "weights.pt")},
            code_paths=[str(code)], signature=signature, input_example=input_example, tags=tags,
            # Pinned here rather than inferred: inference loads the model in a subprocess (slow).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"mlflow=={mlflow.__version__}"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info.model_uri


def register(mlflow: Any, model_uri: str, name: str, tags: dict[str, str], alias: str | None) -> str:
    """A new version of registered model `name` from `model_uri`; `alias` (if any) moves onto it."""
    version = mlflow.register_model(model_uri, name, tags=tags)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    log.info("MLflow: registered %s version %s%s", name, version.version, f" @{alias}" if alias else "")
    return str(version.version)
