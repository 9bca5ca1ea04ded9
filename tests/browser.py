"""The README's MLflow UI tour, driven in a real headless Chromium (Debian's `chromium` through
Playwright; Playwright's own browser download is not needed)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.team_server import free_port

REQUIRE_ENV = "DAE_REQUIRE_BROWSER_TEST"  # .ci/run sets it: a missing browser fails, not skips
# As the machine's browser probe starts it: no background connections to a network it cannot reach.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    """The Chromium executable, or skip the test (fail it where CI requires the browser test)."""
    path = os.environ.get("DAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = "no Chromium or no Playwright (requirements-dev.txt; Debian's package chromium)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{why}, but {REQUIRE_ENV} is set", pytrace=False)
        pytest.skip(why)
    return path


@contextmanager
def mlflow_ui(store: Path, log: Path):
    """`mlflow ui --backend-store-uri sqlite:///<store>` as the README starts it, on a free port."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                                   f"sqlite:///{store}", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(1)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(30)


def filter_runs(page, query: str, shown: str, absent: str, tries: int = 4) -> None:
    """Type `query` into the Runs page's search box until the grid shows a run named `shown` and
    none named `absent`. The page may still be loading, or restoring its last filter, when the
    query is first typed (seen once here: the grid showed no run for a minute), so a try that
    shows no change within 20 s types it again."""
    from playwright.sync_api import expect

    for attempt in range(tries):
        search = page.get_by_placeholder(re.compile(r"metrics\."))
        search.fill(query)
        search.press("Enter")
        try:
            expect(page.get_by_role("link", name=absent, exact=True)).to_have_count(0, timeout=20_000)
            expect(page.get_by_role("link", name=shown, exact=True).first).to_be_visible(timeout=20_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise AssertionError(f"the runs grid never showed {shown!r} without {absent!r} for {query!r}; "
                                     f"the search box holds {search.input_value()!r}") from None


def follow(page, url: str, link) -> None:
    """Open the page a link points to."""
    page.goto(f"{url}/{link.get_attribute('href')}")


def readme_tour(url: str, chromium: str, models: list[str], screenshots: Path) -> None:
    """The README's steps: Model training → Experiments → dae-mnist → the Runs page; search the
    evaluate run; its page shows the test metrics and its per-seed child runs; a seed run's Model
    metrics tab has the loss curves; the Model registry lists the registered models."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        page.set_default_timeout(60_000)
        try:
            page.goto(url)
            page.get_by_text("Model training", exact=True).first.click()  # the UI opens in GenAI mode
            page.get_by_role("link", name="Experiments").first.click()
            page.get_by_role("link", name="dae-mnist", exact=True).first.click()
            expect(page).to_have_url(re.compile(r"#/experiments/\d+/runs"))
            filter_runs(page, "tags.stage = 'evaluate'", "evaluate", absent="finetune")
            follow(page, url, page.get_by_role("link", name="evaluate", exact=True).first)
            expect(page.get_by_role("tab", name="Model metrics")).to_be_visible()
            expect(page.get_by_role("tab", name="System metrics")).to_be_visible()
            for model in models:
                expect(page.get_by_text(f"{model}.mse_noisy", exact=True).first).to_be_attached()
                expect(page.get_by_role("link", name=f"evaluate {model} seed 0")).to_be_visible()
            page.screenshot(path=str(screenshots / "evaluate_run.png"), full_page=True)

            page.get_by_role("link", name="Runs", exact=True).first.click()
            filter_runs(page, "tags.stage = 'finetune'", "finetune", absent="evaluate")
            # The stage run's page lists its runs per model and seed, as the "+" before its name in
            # the grid does. In about one load in five the grid keeps re-rendering its rows, so a
            # click there waits in vain for a row to hold still: its links are followed by address.
            follow(page, url, page.get_by_role("link", name="finetune", exact=True).first)
            follow(page, url, page.get_by_role("link", name="finetune greedy_ft seed 0").first)
            page.get_by_role("tab", name="Model metrics").click()
            for curve in ("train_loss", "val_loss"):
                expect(page.get_by_text(curve, exact=True).first).to_be_visible()

            page.get_by_role("link", name="Model registry").first.click()
            expect(page).to_have_url(re.compile(r"#/models"))
            for model in models:
                expect(page.get_by_role("link", name=f"dae-mnist-{model}", exact=True)).to_be_visible()
            page.screenshot(path=str(screenshots / "model_registry.png"))
        except Exception:
            page.screenshot(path=str(screenshots / "failure.png"), full_page=True)
            (screenshots / "failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
