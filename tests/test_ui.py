"""As a user would: start `dagster dev` and an MLflow server, launch the smoke chain from the Dagster
UI in headless Chromium (Debian's chromium + chromium-driver), watch each run succeed, then find the
run and the champion model in the MLflow UI.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`.ci/run` installs them). Without them the test
is skipped, unless FLOWBP_REQUIRE_UI=1 (set by CI), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import SMOKE

ROOT = Path(__file__).resolve().parents[1]
BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    # its own process group: `dagster dev` starts a webserver, a daemon and code servers
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not (BROWSER and DRIVER):
        msg = "headless Chromium needed: apt-get install chromium chromium-driver"
        if os.environ.get("FLOWBP_REQUIRE_UI") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("ui")
    mlflow_port, dagster_port = _free_port(), _free_port()
    params = {**SMOKE, "methods": ["flowbp_sparse"], "world_dir": str(root / "data" / "world"),
              "data_dir": str(root / "data"), "tracking": {"tracking_uri": f"http://127.0.0.1:{mlflow_port}"},
              # a smoke world does not improve: open the gates so that the chain ends with a champion
              "promote": {"min_improvement": -10.0, "heldout_tolerance_sd": 100.0, "min_diversity_ratio": 0.0,
                          "min_judge_gain": -10.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dagster").mkdir()
    (root / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster"), "FLOWBP_PARAMS": str(root / "params.yaml"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    procs = []
    try:
        procs.append(_start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "mlartifacts"),
                             "-h", "127.0.0.1", "-p", str(mlflow_port), "--workers", "1"], root / "mlflow.log", env))
        procs.append(_start([sys.executable, "-m", "dagster", "dev", "-m", "pipelines.definitions",
                             "-h", "127.0.0.1", "-p", str(dagster_port)], root / "dagster.log", env))
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", procs[0], root / "mlflow.log")
        _wait_http(f"http://127.0.0.1:{dagster_port}/server_info", procs[1], root / "dagster.log")
        yield {"root": root, "dagster": f"http://127.0.0.1:{dagster_port}",
               "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        for p in procs:
            _stop(p)


@pytest.fixture(scope="module")
def browser(servers):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = BROWSER
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _until(driver, what: str, fn, timeout: float = 120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            value = fn()
        except Exception:  # the page is still rendering (stale or missing elements)
            value = None
        if value:
            return value
        time.sleep(1)
    driver.save_screenshot(str(Path(os.environ.get("PYTEST_SCREENSHOTS", "/tmp")) / "flowbp-ui-failure.png"))
    pytest.fail(f"{what} not seen in {timeout} s; page text:\n{_text(driver)[:3000]}")


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _button(driver, label: str):
    from selenium.webdriver.common.by import By

    return next((b for b in driver.find_elements(By.TAG_NAME, "button")
                 if b.text.strip() == label and b.is_displayed() and b.is_enabled()), None)


def _launch(driver, base: str, job: str, partition: str | None = None) -> str:
    """Open the job's launchpad, pick the partition, press Launch Run; returns the run's final status."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{base}/locations/pipelines.definitions/jobs/{job}/playground")
    _until(driver, f"{job} launchpad", lambda: _button(driver, "Launch Run") or _button(driver, "Skip"))
    if skip := _button(driver, "Skip"):  # the first visit's newsletter dialog
        skip.click()
    if partition:
        box = _until(driver, "partition picker",
                     lambda: driver.find_element(By.CSS_SELECTOR, "input[placeholder='Partition']"))
        box.click()
        box.send_keys(partition)
        time.sleep(1)
        box.send_keys(Keys.ENTER)
        _until(driver, f"partition tag {partition}", lambda: f"partition: {partition}" in _text(driver))
    _until(driver, "config without errors", lambda: "No errors" in _text(driver))
    _until(driver, "Launch Run", lambda: _button(driver, "Launch Run")).click()
    _until(driver, "the run page", lambda: "/runs/" in driver.current_url, timeout=60)
    run_id = driver.current_url.rsplit("/", 1)[-1][:8]

    def status():
        # the run header reads "Runs / <id> / <status> / Run of <job>"
        lines = _text(driver).splitlines()
        i = lines.index(run_id)
        return lines[i + 1] if lines[i + 1] in ("Success", "Failure", "Canceled") else None

    return _until(driver, f"{job} finishing", status, timeout=900)


def test_dagster_ui_runs_the_chain_and_mlflow_ui_shows_the_champion(servers, browser):
    from selenium.webdriver.common.by import By

    dag, mlf = servers["dagster"], servers["mlflow"]
    assert _launch(browser, dag, "prepare") == "Success"
    assert _launch(browser, dag, "variant", partition="flowbp_sparse") == "Success"
    assert _launch(browser, dag, "compare_and_promote") == "Success"

    # the asset catalog shows the variant's blocking checks, all passed
    browser.get(f"{dag}/assets/evaluation?view=checks")
    for check in ("reward_improved", "heldout_not_collapsed", "heldout_judge_improved", "diversity_not_collapsed"):
        _until(browser, f"check {check}", lambda c=check: c in _text(browser))
    data = servers["root"] / "data"
    promoted = json.loads((data / "promoted.json").read_text())
    assert promoted["promoted"] == "flowbp_sparse" and promoted["champion"] == promoted["version"], promoted

    # MLflow UI: the experiment lists the variant's run; the registry shows the champion
    browser.get(f"{mlf}/#/experiments")
    # MLflow 3 opens on its GenAI views; training runs are under "Model training"
    _until(browser, "the Model training switch",
           lambda: browser.find_element(By.XPATH, "//*[normalize-space(text())='Model training']")).click()
    link = _until(browser, "experiment flowbp",
                  lambda: next(a for a in browser.find_elements(By.TAG_NAME, "a") if a.text.strip() == "flowbp"))
    link.click()
    _until(browser, "the variant's training run", lambda: "flowbp_sparse" in _text(browser))
    browser.get(f"{mlf}/#/models/flowbp-default")
    _until(browser, "registered model with the champion alias",
           lambda: f"Version {promoted['version']}" in _text(browser) and "champion" in _text(browser))
