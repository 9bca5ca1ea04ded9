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

from bench.load_test import free_port

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


def readme_tour(url: str, chromium: str, models: list[str], screenshots: Path) -> None:
    """The README's steps: Model training → Experiments → dae-mnist → the Runs page; search the
    evaluate run; its page shows the test metrics and its per-seed child runs; a seed run's Model
    metrics tab has the loss curves; the Model registry lists the registered models."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(url)
            page.get_by_text("Model training", exact=True).first.click()  # the UI opens in GenAI mode
            page.get_by_role("link", name="Experiments").first.click()
            page.get_by_role("link", name="dae-mnist", exact=True).first.click()
            expect(page).to_have_url(re.compile(r"#/experiments/\d+/runs"))
            search = page.get_by_placeholder(re.compile(r"metrics\."))
            search.fill("tags.stage = 'evaluate'")
            search.press("Enter")
            page.get_by_role("link", name="evaluate", exact=True).first.click()
            expect(page.get_by_role("tab", name="Model metrics")).to_be_visible()
            expect(page.get_by_role("tab", name="System metrics")).to_be_visible()
            for model in models:
                expect(page.get_by_text(f"{model}.mse_noisy", exact=True).first).to_be_attached()
                expect(page.get_by_role("link", name=f"evaluate {model} seed 0")).to_be_visible()
            page.screenshot(path=str(screenshots / "evaluate_run.png"), full_page=True)

            page.get_by_role("link", name="Runs", exact=True).first.click()
            search = page.get_by_placeholder(re.compile(r"metrics\."))
            search.fill("tags.stage = 'finetune'")
            search.press("Enter")
            # the "+" before the stage run's name shows its runs per model and seed
            page.locator(".ag-pinned-left-cols-container [role=row]").first.locator("button").first.click()
            page.get_by_role("link", name="finetune greedy_ft seed 0").first.click()
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
            raise
        finally:
            browser.close()
