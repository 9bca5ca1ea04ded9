"""A trained denoiser as an MLflow pyfunc model ("models from code": this file is the model).

The evaluate stage logs every model it scores with this file as the model's code, the weights of
one seed as its artifact and `dae/model.py` beside it, copied as `dae_tied_autoencoder.py`
(code_paths). Loaded from MLflow it needs torch, numpy and mlflow only, not this repository:

    model = mlflow.pyfunc.load_model("models:/dae-mnist-greedy_ft@current")
    model.predict(images)                                  # reconstructions, [n, 784]
    model.predict(images, params={"output": "code"})       # bottleneck codes, [n, 32]

`images`: float32 [n, 784], flattened 28x28 images with pixels in [0, 1]; noisy ones may lie
outside, within PIXEL_RANGE. At most MAX_BATCH images a call. Anything else is refused, before
any work, with a message that says what was expected and does not echo the input (HTTP 400 when
served). The signature declares no input schema on purpose: MLflow would enforce it first, with
its own message after an echo of the input, so this file checks the input itself (`as_batch`).
"""
from __future__ import annotations

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

try:  # inside a logged model: the copy that travels with it
    from dae_tied_autoencoder import TiedAutoencoder
except ImportError:  # in the repository (the evaluate stage checks the model as it logs it)
    from dae.model import TiedAutoencoder

INPUT_WIDTH = 784
# Clean pixels are in [0, 1]; the pipeline's noisy inputs (unclipped Gaussian noise, σ = 0.3)
# stay within this band by more than 6σ. A value outside is not an image of this model.
PIXEL_RANGE = (-2.0, 3.0)
# The largest batch one call answers (~31 MB of float32 in, as much out): bigger ones are split by the caller.
MAX_BATCH = 10_000
OUTPUTS = ("reconstruction", "code")
WEIGHTS = "weights"  # the artifact's key: a torch file {"arch": ..., "state_dict": ...}


class Refusal(MlflowException):
    """An input this model does not take: HTTP 400 whose message is the reason alone.

    MLflow's scoring server (mlflow/pyfunc/scoring_server, `invocations`) rewrites the message of
    an MlflowException raised in predict to "Failed to predict data '<the input>'. Error: ...",
    which puts an echo of the request (kilobytes of pixels) before the reason. A refusal's
    message is set once, when it is raised, so a client's first line is what was wrong and
    what is expected (tests/test_pipeline.py checks it over HTTP)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):  # MlflowException.__init__ sets it; later rewrites are ignored
            self._reason = value


def as_batch(model_input) -> np.ndarray:
    """The input as a float32 [n, 784] array of finite values, or a clear refusal."""
    if hasattr(model_input, "to_numpy"):  # a pandas DataFrame
        model_input = model_input.to_numpy()
    try:
        batch = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError):
        raise Refusal("expected numbers (float32 pixels in [0, 1]), got values that are not numbers") from None
    if batch.ndim >= 1 and batch.shape[0] == 0:
        raise Refusal(f"empty batch: send at least one image of {INPUT_WIDTH} values")
    if batch.ndim != 2 or batch.shape[1] != INPUT_WIDTH:
        raise Refusal(f"expected a batch of flattened 28x28 images, shape (n, {INPUT_WIDTH}); "
                      f"got shape {batch.shape}")
    if batch.shape[0] > MAX_BATCH:
        raise Refusal(f"batch of {batch.shape[0]} images is over the limit of {MAX_BATCH}: send it in parts")
    bad = ~np.isfinite(batch)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise Refusal(f"image {row} holds NaN or infinite values; expected finite pixels in [0, 1]")
    lo, hi = PIXEL_RANGE
    outside = (batch < lo) | (batch > hi)
    if outside.any():
        row = int(np.argwhere(outside)[0][0])
        raise Refusal(f"image {row} has pixels outside [{lo:g}, {hi:g}]; expected pixels in [0, 1] "
                      "(noisy images may stray a little outside)")
    return batch


class Denoiser(PythonModel):
    def load_context(self, context) -> None:
        saved = torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True)
        self.model = TiedAutoencoder.from_arch(saved["arch"])
        self.model.load_state_dict(saved["state_dict"])
        self.model.eval()

    # model_input's hint: the input is checked here (as_batch), not by a signature's schema;
    # unannotated, every log and load warns that hints are missing.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        output = (params or {}).get("output", "reconstruction")
        if output not in OUTPUTS:
            raise Refusal(f"params.output must be one of {list(OUTPUTS)}, got {output!r}")
        batch = torch.from_numpy(as_batch(model_input))
        with torch.no_grad():
            result = self.model(batch) if output == "reconstruction" else self.model.encode(batch)
        return result.numpy()


set_model(Denoiser())
