"""Fault injection: real stage processes fed bad data, bad params, broken artifacts, a dead
tracking server, an unwritable output folder and SIGTERM. Each case checks the exit status,
that the message names the cause, and that no output was half-written or silently replaced."""
import gzip
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dae.lanes import lane_count, split
from tests.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
# 20 epochs, ~1.5 s on a 2-core CPU: a kill after epoch 3 comes well before the end.
LONG_FINETUNE = {"shallow": 1, "random_ft": 20, "greedy_ft": 20}


@pytest.fixture(scope="module")
def prepared(tiny_pipeline, tmp_path_factory, mnist_mirror):
    """A copy of the session's tiny-profile workspace, where every stage has run once (with
    tracking; these cases run stage processes directly, with tracking off)."""
    path = tiny_pipeline[0]
    return Workspace(path, mnist_mirror).copy(tmp_path_factory.mktemp("faults") / "ws")


@pytest.fixture()
def ws(prepared, tmp_path):
    """A fresh copy of the prepared workspace for each case."""
    return prepared.copy(tmp_path / "ws")


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".part"))]


def bad_mirror(ws: Workspace, tmp_path: Path) -> Path:
    mirror = tmp_path / "mirror"
    shutil.copytree(ws.env["DAE_DATA_MIRROR"], mirror)
    for f in mirror.iterdir():
        f.chmod(0o644)
    return mirror


def assert_download_failed(ws, result, *names):
    assert result.returncode == 1, result.stderr
    assert "ERROR in stage download" in result.stderr
    for name in names:
        assert name in result.stderr
    assert no_temp_files(ws.path / "data" / "raw")


# --- Data -----------------------------------------------------------------------------------

def run_download(ws, mirror):
    shutil.rmtree(ws.path / "data" / "raw")  # as DVC does before running the stage
    # Only the given mirror: the public ones are unreachable here and would only add time.
    return ws.stage("download", env={"DAE_DATA_MIRROR": str(mirror), "DAE_PUBLIC_MIRRORS": "off"})


def test_checksum_mismatch(ws, tmp_path):
    mirror = bad_mirror(ws, tmp_path)
    gz = mirror / "train-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(gz.read_bytes()))
    data[-1] ^= 0xFF
    gz.write_bytes(gzip.compress(bytes(data)))
    assert_download_failed(ws, run_download(ws, mirror), "checksum mismatch for train-labels-idx1-ubyte")
    assert not any((ws.path / "data" / "raw").iterdir())


def test_wrong_idx_magic(ws):
    raw = ws.path / "data" / "raw" / "train-labels-idx1-ubyte"
    raw.write_bytes(b"\x00\x00\x08\x02" + raw.read_bytes()[4:])
    before = ws.snapshot("data/noisy")
    result = ws.stage("noise")
    assert result.returncode == 1 and "train-labels-idx1-ubyte: wrong IDX magic number" in result.stderr
    assert ws.snapshot("data/noisy") == before


# --- Params ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, key, value, message", [
    ("noise", "noise.level", -0.3, "noise.level: must be a finite number >= 0, got -0.3"),
    ("download", "data.dataset", "cifar10", "data.dataset: must be one of"),
    ("pretrain_layer@1", "arch.bottleneck", 100, "arch.bottleneck: 100 is wider than the narrowest"),
    ("finetune", "finetune.lr", -0.1, "finetune.lr: must be a finite number > 0"),
    ("evaluate", "classifier.epochs", 0, "classifier.epochs: must be an integer >= 1, got 0"),
])
def test_bad_params_fail_before_any_work(ws, stage, key, value, message):
    ws.set_param(key, value)
    folder = {"noise": "data/noisy", "download": "data/raw"}.get(stage, "data/models")
    before = ws.snapshot(folder)
    result = ws.stage(stage)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert ws.snapshot(folder) == before  # nothing replaced


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(ws):
    ws.set_param("device", "cuda")
    result = ws.stage("pretrain_layer@1")
    assert result.returncode == 1 and "'cuda' was requested but CUDA is not available" in result.stderr


# --- Artifacts and training -----------------------------------------------------------------

def test_corrupt_checkpoint(ws):
    (ws.path / "data/models/pretrain/layer_1.pt").write_bytes(b"not a checkpoint at all")
    layer_2 = (ws.path / "data/models/pretrain/layer_2.pt").read_bytes()
    result = ws.stage("pretrain_layer@2")
    assert result.returncode == 1 and "layer_1.pt is corrupt" in result.stderr
    assert (ws.path / "data/models/pretrain/layer_2.pt").read_bytes() == layer_2  # the old output kept


def test_checkpoint_architecture_mismatch(ws):
    ws.set_param("arch.hidden", [60, 56, 48, 40, 32, 24, 16])
    result = ws.stage("pretrain_layer@2")
    assert result.returncode == 1 and "layer_1.pt has architecture" in result.stderr
    assert "[784, 64]" in result.stderr and "[784, 60]" in result.stderr


def test_diverging_loss_names_stage_epoch_and_lr(ws):
    ws.set_param("pretrain.lr", 1e38)  # Adam steps of ~lr overflow float32
    before = ws.snapshot("data/models")
    result = ws.stage("pretrain_layer@1")
    assert result.returncode == 1, result.stderr
    assert "pretrain_layer@1 seed 0: loss became nan at epoch 1" in result.stderr
    assert "lower learning rate" in result.stderr
    assert ws.snapshot("data/models") == before


def test_unreachable_tracking_server_fails_fast(ws):
    start = time.monotonic()
    result = ws.stage("pretrain_layer@1",
                      env={"DAE_TRACKING": "on", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == 1 and "cannot use the MLflow tracking store http://127.0.0.1:9" in result.stderr
    assert "DAE_TRACKING=off" in result.stderr and "epoch 1" not in result.stderr
    assert time.monotonic() - start < 60


def test_unwritable_output_folder(ws):
    shutil.rmtree(ws.path / "data/models/pretrain")
    (ws.path / "data/models/pretrain").write_text("a file where the output folder should be")
    result = ws.stage("pretrain_layer@1")
    assert result.returncode == 1 and "ERROR in stage pretrain_layer@1:" in result.stderr
    assert "data/models/pretrain" in result.stderr


# --- Interruptions and determinism ----------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> dict[str, bytes]:
    """finetune's models after an uninterrupted run of LONG_FINETUNE epochs."""
    ws = prepared.copy(tmp_path_factory.mktemp("uninterrupted") / "ws")
    ws.set_param("finetune.epochs", LONG_FINETUNE)
    result = ws.stage("finetune")
    assert result.returncode == 0 and "resuming" not in result.stderr, result.stderr
    return {path.name: path.read_bytes() for path in sorted((ws.path / "data/models/finetune").glob("*.pt"))}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_kill_mid_training_leaves_no_output_and_resumes_identically(ws, uninterrupted, sig):
    """SIGTERM unwinds (temporary files removed, one clear line); SIGKILL cannot, but the
    per-epoch checkpoint is written atomically, so either way the rerun resumes from the last
    complete epoch and ends bit-identical to an uninterrupted run."""
    ws.set_param("finetune.epochs", LONG_FINETUNE)
    outputs = sorted((ws.path / "data/models/finetune").glob("*.pt"))
    for path in outputs:
        path.unlink()  # as DVC does before running the stage
    proc = subprocess.Popen(ws.command("finetune"), cwd=ws.path, env=ws.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill it once a few epochs have been checkpointed
        if "greedy_ft seed 0 epoch 3/20" in line:  # random_ft and greedy_ft: one stack of two
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=60)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 1 and "interrupted by SIGTERM" in rest
        assert no_temp_files(ws.path / "data")
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not any(path.exists() for path in outputs)
    # One resume state per lane (dae.lanes): on a CPU, random_ft and greedy_ft train side by side.
    members = ["random_ft-seed0", "greedy_ft-seed0"]
    lanes = ["+".join(lane) for lane in split(members, lane_count(len(members), torch.device("cpu")))]
    assert all((ws.path / f"data/checkpoints/finetune/{lane}.pt").exists() for lane in lanes)

    resumed = ws.stage("finetune")
    assert resumed.returncode == 0, resumed.stderr
    # The kill came after epoch 3 was logged: epoch 2 at least was checkpointed.
    assert re.search(r"resuming after epoch ([2-9]|[1-3][0-9])\b", resumed.stderr), resumed.stderr
    assert not (ws.path / "data/checkpoints/finetune").exists()  # cleared once done
    assert {path.name: path.read_bytes() for path in outputs} == uninterrupted


def test_two_cpu_runs_are_bit_identical(ws):
    """Rerun each kind of stage that draws random numbers (the first pretraining layer, a deeper one
    on its codes, fine-tuning, the classifiers of evaluate): the same bytes of models and metrics.
    Layers 3..8 run the code of layer 2. The first run is the session's `dvc repro`, with
    tracking on; the rerun has it off: tracking does not touch what is trained."""
    outputs = ["data/models/pretrain/layer_1.pt", "data/models/pretrain/layer_2.pt",
               *[f"data/models/finetune/{model}.pt" for model in ("shallow", "random_ft", "greedy_ft")],
               "reports/metrics.json"]
    before = {p: (ws.path / p).read_bytes() for p in outputs}
    ws.run_all(["pretrain_layer@1", "pretrain_layer@2", "finetune", "evaluate"])
    assert {p: (ws.path / p).read_bytes() for p in outputs} == before
