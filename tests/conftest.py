"""Shared fixtures: the real MNIST mirror ($DAE_DATA_MIRROR, else ../shared/data/mnist, else a copy
fetched once from the public mirrors into ~/.cache/dae-mnist/mirror)."""
import gzip
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mnist_mirror_path() -> Path | None:
    candidates = [os.environ.get("DAE_DATA_MIRROR"), ROOT.parent / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate).resolve()
    return None


CACHE = Path.home() / ".cache" / "dae-mnist" / "mirror"
HINT = ("set DAE_DATA_MIRROR to a folder holding the four MNIST IDX files "
        "(train-images-idx3-ubyte.gz, ...; gzipped or not)")


def _public_copy() -> Path:
    """A contributor with internet: the four files from the public mirrors, verified and
    gzipped into CACHE once, so the tests that copy or break a mirror folder can use it."""
    from dae.data import DATASETS, DataError, download

    if all((CACHE / f"{name}.gz").exists() for name in DATASETS["mnist"].sha256):
        return CACHE
    raw = CACHE.parent / "raw"
    try:
        download("mnist", raw, mirrors=list(DATASETS["mnist"].mirrors))
    except DataError as exc:
        pytest.fail(f"no MNIST mirror here and the public mirrors failed: {HINT}. ({str(exc).splitlines()[0]})",
                    pytrace=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in DATASETS["mnist"].sha256:
        (CACHE / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes(), mtime=0))
    return CACHE


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    path = mnist_mirror_path()
    if path is not None:
        return path
    if os.environ.get("CI"):  # CI has no internet: the mirror must be there
        pytest.fail(f"the real MNIST mirror is missing: {HINT}, or provide ../shared/data/mnist", pytrace=False)
    return _public_copy()


@pytest.fixture(scope="session")
def mnist_raw(mnist_mirror, tmp_path_factory) -> Path:
    """The four IDX files, downloaded (verified) once per test session from the mirror."""
    from dae.data import download

    out = tmp_path_factory.mktemp("raw")
    download("mnist", out, mirrors=[str(mnist_mirror)])
    return out


@pytest.fixture(scope="session")
def fashion_experiment(tmp_path_factory, mnist_mirror):
    """`dvc exp run -n fashion-two-d -S data.dataset=fashion-mnist -S arch.bottleneck=2` in a
    fresh tiny-profile copy of the repository, started in the background: tiny_pipeline asks
    for it first when a collected test uses it, so that the two pipelines, mostly stage start-up,
    run side by side. Returns (path, runner, wait), wait() -> the finished CompletedProcess."""
    import subprocess

    from tests.workspace import FASHION_EXPERIMENT, make_workspace

    ws = tmp_path_factory.mktemp("fashion")
    run = make_workspace(ws, mnist_mirror)
    logs = tmp_path_factory.mktemp("fashion-log")
    with (logs / "stdout.txt").open("w") as stdout, (logs / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", *FASHION_EXPERIMENT], cwd=ws, text=True,
                                stdout=stdout, stderr=stderr, env=run.env)

    def wait() -> subprocess.CompletedProcess:
        proc.wait(timeout=1800)
        return subprocess.CompletedProcess(proc.args, proc.returncode, (logs / "stdout.txt").read_text(),
                                           (logs / "stderr.txt").read_text())

    yield ws, run, wait
    if proc.poll() is None:  # the test that waits for it was deselected or failed early
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def tiny_pipeline(request, tmp_path_factory, mnist_mirror):
    """A copy of the repository (what git would clone) with the tiny profile applied, and its
    first `dvc repro` (tracking on); while that one trains, a second `dvc repro` in the same
    workspace. Its lock and reports are committed, as the repository commits its own.
    Returns (path, runner, first, second). The end-to-end tests use it as it is; the fault tests
    copy it, so the pipeline runs once per session."""
    import subprocess

    from tests.workspace import FASHION_MNIST, make_workspace

    if FASHION_MNIST.is_dir() and any("fashion_experiment" in getattr(item, "fixturenames", ())
                                      for item in request.session.items):
        request.getfixturevalue("fashion_experiment")  # starts it, to run beside this one
    ws = tmp_path_factory.mktemp("repo")
    run = make_workspace(ws, mnist_mirror)
    log = tmp_path_factory.mktemp("log") / "stderr.txt"
    with log.open("w") as stderr:  # a file: a full pipe would block the stages
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=ws, text=True, stdout=subprocess.PIPE,
                                stderr=stderr, env={**run.env, "PYTHONUNBUFFERED": "1"})
        stdout = []
        for line in proc.stdout:
            stdout.append(line)
            if "Running stage 'pretrain_layer@1'" in line:
                break
        second = run(sys.executable, "-m", "dvc", "repro", check=False)
        rest = proc.communicate(timeout=1800)[0]
    first = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(stdout) + rest, log.read_text())
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "tiny results")
    return ws, run, first, second


POSTGRES_ENV = "DAE_TEST_POSTGRES_URI"


@pytest.fixture(scope="session")
def postgres_uri() -> str:
    uri = os.environ.get(POSTGRES_ENV)
    if not uri:
        if os.environ.get("DAE_REQUIRE_SERVER_TEST"):
            pytest.fail(f"{POSTGRES_ENV} is not set but DAE_REQUIRE_SERVER_TEST is: PostgreSQL did not start")
        pytest.skip(f"{POSTGRES_ENV} is not set (see .ci/run for how CI starts PostgreSQL)")
    assert "@127.0.0.1" in uri or "@localhost" in uri, "the test only talks to loopback"
    return uri


@pytest.fixture(autouse=True)
def _restore_mlflow_environment():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI and also keeps the URI in-process, where
    it wins over the variable: keep one test's store out of the next (a later test that sets the
    variable to a server would otherwise still read the earlier test's SQLite registry)."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {name: os.environ.get(name) for name in names}
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
