"""The explorer in a real headless Chromium: `workbench app` as a user starts it, driven by
Selenium through Debian's chromedriver at a 1280 × 800 viewport.

One session walks every page: the Runs list (with error panels for the corrupt and foreign
files), the Atlas (a real click on a heatmap cell opens the head), the Head page (pattern with
token labels), an ablation in the Intervention lab (background job, result with CI and random
control), Compare and Circuit; then bad run keys (path traversal, corrupt file) get error panels
while the server keeps serving. A full-page screenshot per page lands in test-artifacts/app/.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "app"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTH, HEIGHT = 1280, 800

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
    ),
    pytest.mark.slow,
    # old selenium releases call a urllib3 method that urllib3 2.0 deprecates, once per command
    pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "app", str(runs_dir), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=runs_dir.parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app server did not start:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
        assert proc.poll() is None, f"the server died:\n{log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    yield driver
    driver.quit()


def _wait(driver, css: str, timeout: float = 30, text: str | None = None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    if text is None:
        return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return driver.find_element(By.CSS_SELECTOR, css)


def _settle(driver) -> None:
    """Wait until Dash has no callback in flight (the page stops changing)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = driver.execute_script(
            "return document.querySelectorAll('[data-dash-is-loading=\"true\"]').length"
        )
        if not busy:
            break
        time.sleep(0.2)
    time.sleep(0.5)


def _page_fits(driver) -> None:
    """At 1280 px nothing is wider than the viewport (no sideways scrolling, no clipped text)."""
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= WIDTH, f"page is {width}px wide at a {WIDTH}px viewport"


def _screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
        },
    )
    (ARTIFACTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


def _click_heatmap_cell(driver, graph_id: str, layer: int, head: int) -> None:
    """A real mouse click at the centre of cell (layer, head) of a plotly heatmap."""
    gd = _wait(driver, f"#{graph_id} .js-plotly-plot")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", gd)
    x, y = driver.execute_script(
        """
        const gd = arguments[0], xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        const box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.l2p(arguments[1]),
                box.top + ya._offset + ya.l2p(arguments[2])];
        """,
        gd,
        head,
        layer,
    )
    _click_at(driver, x, y)


def _click_scatter_point(driver, graph_id: str, customdata: list[int]) -> None:
    """A real mouse click on the scatter point whose customdata is ``customdata``."""
    gd = _wait(driver, f"#{graph_id} .js-plotly-plot")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", gd)
    x, y = driver.execute_script(
        """
        const gd = arguments[0], want = JSON.stringify(arguments[1]);
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        const box = gd.getBoundingClientRect();
        for (const trace of gd.data) {
            const i = (trace.customdata || []).findIndex(c => JSON.stringify(c) === want);
            if (i >= 0) return [box.left + xa._offset + xa.l2p(trace.x[i]),
                                box.top + ya._offset + ya.l2p(trace.y[i])];
        }
        return null;
        """,
        gd,
        customdata,
    )
    _click_at(driver, x, y)


def _click_at(driver, x: float, y: float) -> None:
    """Hover, then click: plotly resolves a click to the point its (throttled) hover found."""
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(int(x), int(y))
    actions.w3c_actions.pointer_action.pause(0.6)
    actions.w3c_actions.pointer_action.click()
    actions.perform()


def test_explorer_in_chromium(server: str, browser) -> None:
    try:
        _walk(server, browser)
    except BaseException:
        _screenshot(browser, "failure")
        (ARTIFACTS / "failure.html").write_text(browser.page_source)
        raise


def _walk(server: str, d) -> None:

    # the server listens on this machine only
    import psutil

    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    port = int(server.rsplit(":", 1)[1])
    assert {c.laddr.ip for c in listening if c.laddr.port == port} == {"127.0.0.1"}

    # Runs: both scans listed; the corrupt and foreign files are error panels, not a crash
    d.get(server + "/")
    _wait(d, "table", text="a.h5")
    panels = _wait(d, ".error-panel").find_element("xpath", "..").text
    assert "corrupt.h5 cannot be read" in panels and "foreign.h5 cannot be read" in panels
    _page_fits(d)
    _screenshot(d, "runs")

    # Atlas: grid of the sink score with KV groups; a click on cell (1, 2) opens that head
    d.get(server + "/atlas?run=a.h5")
    _wait(d, "#atlas-grid .heatmaplayer")
    _wait(d, "#atlas-scatter .scatterlayer, #atlas-scatter canvas", timeout=60)
    _settle(d)
    _page_fits(d)
    _screenshot(d, "atlas")
    _click_heatmap_cell(d, "atlas-grid", layer=1, head=2)
    _wait(d, "#head-title", text="Head L1 H2")
    assert "/head?run=a.h5&layer=1&head=2" in d.current_url
    assert "KV head 1" in d.find_element("id", "head-labels").text

    # Head: scores with definitions, the pattern of a stored prompt with token labels
    _wait(d, "#head-pattern .heatmaplayer", timeout=60)
    _wait(d, "#head-top-tokens", text="<bos>")
    assert "first-token sink" in d.find_element("css selector", ".page-head table").text
    _settle(d)
    _page_fits(d)
    _screenshot(d, "head")

    # Compare: same model on two prompt sets, shared colour scale and the difference
    d.get(server + "/compare?a=a.h5&b=b.h5")
    _wait(d, "#compare-grid .heatmaplayer")
    _wait(d, "#compare-changes")
    assert "difference B − A" in d.find_element("id", "compare-grid").text
    _settle(d)
    _page_fits(d)
    _screenshot(d, "compare")

    # Circuit: the stored circuit's graph by class; clicking a node opens that head
    d.get(server + "/circuit?run=a.h5")
    _wait(d, "#circuit-graph .scatterlayer")
    assert "name mover" in d.find_element("id", "circuit-classes").text
    _settle(d)
    _page_fits(d)
    _screenshot(d, "circuit")
    _click_scatter_point(d, "circuit-graph", [0, 3])
    _wait(d, "#head-title", text="Head L0 H3")

    # Intervention lab on toy-ioi: zero its name mover 1.1 (its card: accuracy drops by 0.56,
    # random heads by 0.01). A background job reports progress; the result shows the metric
    # with and without, the CI and the matched random control.
    d.get(server + "/lab?run=toy-ioi.h5&heads=1.1")
    examples = _wait(d, "#lab-n")
    examples.clear()
    examples.send_keys("32")
    _wait(d, "#lab-go").click()
    summary = _wait(d, "#lab-summary", timeout=120)
    assert "toy: 32 examples" in summary.text and "zero[1.1]" in summary.text
    rows = {
        cells[0].text: cells
        for row in d.find_elements("css selector", "#lab-table tbody tr")
        if (cells := row.find_elements("tag name", "td"))
    }
    accuracy_diff, control_diff = float(rows["accuracy"][3].text), float(rows["accuracy"][6].text)
    assert accuracy_diff < 0 and abs(accuracy_diff) > abs(control_diff)
    assert d.find_element("id", "lab-progress-text").text.endswith("batches scored")
    # two models in this server (the tiny Llama, used by two head views, and toy-ioi): 2 loads
    assert "model loads in this server process so far: 2" in d.page_source
    assert d.find_element("id", "lab-go").is_enabled()
    _settle(d)
    _page_fits(d)
    _screenshot(d, "lab")

    # Bad inputs: no path outside the runs directory, corrupt files are panels; still serving
    for key, message in (
        ("../secret.h5", "not a run file inside the runs directory"),
        ("/etc/passwd", "is not a run key"),
        ("corrupt.h5", "truncated or corrupt"),
        ("foreign.h5", "not a workbench file"),
        ("gone.h5", "does not exist"),
    ):
        d.get(f"{server}/atlas?run={urllib.request.quote(key)}")
        assert message in _wait(d, ".error-panel").text, key
    _screenshot(d, "error")
    d.get(server + "/")
    _wait(d, "table", text="b.h5")
