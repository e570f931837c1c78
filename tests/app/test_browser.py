"""The explorer in a real headless Chromium: `workbench app` as a user starts it, driven by
Selenium through Debian's chromedriver at a 1280 × 800 viewport.

One session walks every view and asserts on what it shows: the Runs list (error panels for the
corrupt and foreign files), the Atlas (a real click on a heatmap cell opens the head; the head
table filtered and downloaded as CSV; circuit classes as a colour; the cluster legend; the
unknown-token warning), the Head page (picker, go-to box, token view with hover, the pattern, all
heads of the layer, what the head writes, where it scores highest; the IOI prompts of toy-ioi
where its name mover writes the answer), the Intervention lab (metric definitions, one axis per
metric, an ablation against random heads, a sweep heatmap, a cancelled job, results stored in the
run file and found again by a restarted server, downloaded as JSON), Circuit (directed graph,
evidence, ablate links) and Compare; then bad run keys get error panels while the server keeps
serving. A full-page screenshot per view lands in test-artifacts/app/.
"""

from __future__ import annotations

import base64
import contextlib
import json
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
DOWNLOADS = ARTIFACTS / "downloads"
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


@contextlib.contextmanager
def _serve(runs_dir: Path, log: Path) -> Iterator[str]:
    """``workbench app RUNS_DIR`` in its own process, as a user starts it; yields its URL."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("OMP_NUM_THREADS", None)  # the server sets its own threads (app.compute)
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
def server(runs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _serve(runs_dir, tmp_path_factory.mktemp("app-server") / "server.log") as url:
        yield url


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
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    for old in DOWNLOADS.iterdir():
        old.unlink()
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(DOWNLOADS)}
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


def _screenshot(driver, name: str, css: str | None = None) -> None:
    """A PNG of the whole page, or of the element ``css`` (with a margin), as a reader sees it
    at 1280 px; the page is scrolled to the top first, so the sticky menu bar sits there."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}
    if css is not None:
        box = driver.execute_script(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
            "return [r.left, r.top + window.scrollY, r.width, r.height];",
            css,
        )
        margin = 8
        clip = {
            "x": max(0, box[0] - margin),
            "y": max(0, box[1] - margin),
            "width": min(WIDTH, box[2] + 2 * margin),
            "height": box[3] + 2 * margin,
            "scale": 1,
        }
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
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


def _click_heatmap_panel(driver, graph_id: str, trace: int) -> None:
    """A real mouse click at the centre of the ``trace``-th heatmap of a figure of subplots."""
    gd = _wait(driver, f"#{graph_id} .js-plotly-plot")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", gd)
    x, y = driver.execute_script(
        """
        const gd = arguments[0], t = gd._fullData[arguments[1]];
        const xa = gd._fullLayout[t.xaxis.replace('x', 'xaxis')];
        const ya = gd._fullLayout[t.yaxis.replace('y', 'yaxis')];
        const box = gd.getBoundingClientRect();
        const n = t.z.length, m = t.z[0].length;
        return [box.left + xa._offset + xa.l2p((m - 1) / 2),
                box.top + ya._offset + ya.l2p((n - 1) / 2)];
        """,
        gd,
        trace,
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


def _downloaded(name_end: str, timeout: float = 30) -> Path:
    """The file the browser saved into DOWNLOADS whose name ends with ``name_end``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in DOWNLOADS.iterdir() if p.name.endswith(name_end)]
        if done:
            return done[0]
        time.sleep(0.3)
    raise AssertionError(f"no download ending in {name_end}: {list(DOWNLOADS.iterdir())}")


def _hover(driver, element) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    ActionChains(driver).move_to_element(element).pause(0.3).perform()


def _choose(driver, dropdown_id: str, text: str) -> None:
    """Pick the option showing ``text`` in a dcc.Dropdown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _wait(driver, f"#{dropdown_id}").click()

    def option(d):
        found = [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if text in o.text]
        return found[0] if found and found[0].is_displayed() else None

    WebDriverWait(driver, 10).until(option).click()


def test_explorer_in_chromium(server: str, browser, runs_dir: Path, tmp_path: Path) -> None:
    try:
        _walk(server, browser, runs_dir, tmp_path)
    except BaseException:
        _screenshot(browser, "failure")
        (ARTIFACTS / "failure.html").write_text(browser.page_source)
        raise


def _walk(server: str, d, runs_dir: Path, tmp_path: Path) -> None:
    import psutil
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    # the server listens on this machine only

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

    # Atlas: grid of the sink score with KV groups, every layer labelled, the cluster legend
    d.get(server + "/atlas?run=a.h5")
    _wait(d, "#atlas-grid .heatmaplayer")
    _wait(d, "#atlas-scatter .scatterlayer, #atlas-scatter canvas", timeout=60)
    _settle(d)
    ticks = [t.text for t in d.find_elements(By.CSS_SELECTOR, "#atlas-grid .ytick text")]
    assert ticks == ["0", "1"]
    legend = d.find_element(By.CSS_SELECTOR, "#atlas-scatter .legend").text
    assert "cluster 0" in legend
    assert not d.find_elements(By.CSS_SELECTOR, ".warning-panel")  # a.h5: known words
    # the head table: every head, filtered by typing a head into its column's filter
    table = _wait(d, "#atlas-table")
    assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr td[data-dash-column=head]")) == 8
    _screenshot(d, "atlas-table", "#atlas-table")
    head_filter = table.find_element(By.CSS_SELECTOR, "th[data-dash-column=head] input")
    head_filter.send_keys("1.2", Keys.ENTER)
    _wait(d, "#atlas-table tbody", text="1.2")
    cells = d.find_elements(By.CSS_SELECTOR, "#atlas-table tbody td[data-dash-column=head]")
    assert [c.text for c in cells] == ["1.2"]
    # ... and downloaded whole as CSV: a row per head, every score, the circuit's classes
    d.find_element(By.ID, "atlas-csv").click()
    rows = _downloaded("a-heads.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["head", "layer", "index", "kv_head"]
    assert "sink" in rows[0] and "circuit ioi" in rows[0] and len(rows) == 1 + 8
    assert any(r.startswith("1.2,") and r.endswith("name mover") for r in rows)
    _page_fits(d)
    _screenshot(d, "atlas")
    # circuit classes as a colour of the grid
    _choose(d, "atlas-view", "circuit · ioi")
    _wait(d, "#atlas-grid .legend", text="name mover")
    assert "3 of 8 heads" in d.find_element(By.ID, "atlas-grid").text
    _settle(d)
    _screenshot(d, "atlas-circuit", "#atlas-grid")
    _choose(d, "atlas-view", "score · sink")
    _wait(d, "#atlas-grid .gtitle", text="sink per head")
    _click_heatmap_cell(d, "atlas-grid", layer=1, head=2)
    _wait(d, "#head-title", text="Head L1 H2")
    assert "/head?run=a.h5&layer=1&head=2" in d.current_url
    assert "KV head 1" in d.find_element("id", "head-labels").text

    # Head: scores with definitions, the token view, pattern, all heads of the layer, what it
    # writes, and where it scores highest
    _wait(d, "#head-pattern .heatmaplayer", timeout=60)
    _wait(d, "#head-top-tokens", text="<bos>")
    assert "first-token sink" in d.find_element("css selector", ".page-head table").text
    grid = _wait(d, "#head-layer-grid")
    assert len(grid.find_elements(By.CSS_SELECTOR, ".heatmaplayer")) == 4  # 4 heads
    assert "H2 ◀" in grid.text
    assert d.find_elements(By.CSS_SELECTOR, "#head-dla .bars")
    writes = d.find_element(By.ID, "head-writes").text
    assert "promotes" in writes and "suppresses" in writes
    assert "basic / first_token_mass" in _wait(d, "#head-top-items").text
    tokens = d.find_elements(By.CSS_SELECTOR, "#head-tokens .tok")
    assert tokens[0].text == "<bos>" and len(tokens) == len(
        d.find_elements(By.CSS_SELECTOR, "#head-pattern .ytick")
    )
    _hover(d, tokens[-1])
    info = _wait(d, "#head-token-info", text="attends most to").text
    weights = json.loads(d.find_element(By.ID, "head-tokens").get_attribute("data-weights"))
    last = weights["rows"][len(tokens) - 1]
    key = max(last, key=lambda kw: kw[1])[0]
    assert f"attends most to {key}:" in info  # the largest weight of the last query's row
    assert "rgba(13, 110, 253" in tokens[key].get_attribute("style")  # coloured blue
    _settle(d)
    _page_fits(d)
    _screenshot(d, "head")
    # the positions where it scores highest across the scan's prompts: ranked, decoded, and
    # each opens its prompt
    _wait(d, "#head-rank").click()
    ranked = _wait(d, "#head-ranked-table", timeout=60)
    rows = ranked.find_elements(By.CSS_SELECTOR, "tbody tr")
    values = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows]
    assert len(rows) >= 5 and values == sorted(values, reverse=True)
    first = rows[0].find_elements(By.TAG_NAME, "td")
    assert first[4].find_element(By.TAG_NAME, "strong").text in first[3].text  # its token
    assert "over 3 prompts" in d.find_element(By.ID, "head-ranked").text
    item = first[2].text.rsplit("#", 1)[1]
    first[2].find_element(By.TAG_NAME, "a").click()
    _wait(d, "#head-prompt-summary", text=f"scan prompt basic #{item}", timeout=60)
    # a click on another head's panel opens that head on the same prompt
    _wait(d, "#head-pattern .heatmaplayer", timeout=60)
    _click_heatmap_panel(d, "head-layer-grid", 3)
    _wait(d, "#head-title", text="Head L1 H3")
    # a prompt longer than the pattern window: outside it, each query's top keys from the kernels
    _wait(d, "#head-pattern .heatmaplayer", timeout=60)
    _choose(d, "head-prompt", "typed text below")
    d.find_element(By.ID, "head-text").send_keys(" ".join(["the cat sat on the mat"] * 14))
    d.find_element(By.ID, "head-show").click()
    _wait(d, "#head-prompt-summary", text="85 tokens", timeout=60)
    tokens = d.find_elements(By.CSS_SELECTOR, "#head-tokens .tok")
    _hover(d, tokens[10])  # the window is the last 64 queries: 21..84
    info = _wait(d, "#head-token-info", text="the kernels' top 4").text
    weights = json.loads(d.find_element(By.ID, "head-tokens").get_attribute("data-weights"))
    assert weights["exact"] == [21, 85] and len(weights["rows"][10]) == 4
    listed = info.split("attends most to ")[1].split(" (the kernels' top 4)")[0]
    assert [entry.split(":")[0] for entry in listed.split(", ")] == [
        str(key) for key, _ in weights["rows"][10]
    ]

    # no head chosen: a picker, not an error; the go-to box opens any head of the run
    d.get(server + "/head?run=a.h5")
    _wait(d, "#head-picker")
    assert not d.find_elements(By.CSS_SELECTOR, ".error-panel")
    goto = _wait(d, "#goto-head")
    goto.send_keys("0.3", Keys.ENTER)
    _wait(d, "#head-title", text="Head L0 H3")
    goto = _wait(d, "#goto-head")
    goto.clear()
    goto.send_keys("7.9", Keys.ENTER)
    assert "outside the model" in _wait(d, "#goto-error", text="outside").text

    # toy-ioi's name mover 1.1 on an IOI prompt of its task: at the last token it attends to
    # the indirect object and writes it (the answer's logit over the subject's)
    d.get(server + "/head?run=toy-ioi.h5&layer=1&head=1&prompt=task:ioi-toy&item=0")
    answer = _wait(d, "#head-answer-dla", timeout=60).text
    share = float(answer.split("adds ")[1].split(" ")[0])
    io = answer.split("logit('")[1].split("'")[0]
    assert share > 0
    tokens = d.find_elements(By.CSS_SELECTOR, "#head-tokens .tok")
    _hover(d, tokens[-1])
    info = _wait(d, "#head-token-info", text="attends most to").text
    target = info.split("attends most to ")[1].split(";")[0]  # 'k:"token" (weight)'
    assert f'"{io}"' in target  # the indirect object, not the sink
    # and what it writes there: the indirect object is the token it promotes most
    first = d.find_elements(By.CSS_SELECTOR, "#head-writes tbody tr td")[0].text
    assert first == f"'{io}'"
    bars = d.execute_script(
        "return Array.from(document.querySelector('#head-dla .js-plotly-plot')._fullData[0].y)"
    )
    assert bars[-1] > 0  # the last bar: its logit of the answer
    _settle(d)
    _screenshot(d, "head-ioi")
    _screenshot(d, "head-ioi-tokens", "#head-token-view")
    _screenshot(d, "head-ioi-layer", "#head-layer-grid")
    _screenshot(d, "head-ioi-writes", "#head-dla")
    # where 1.1 attends most sharply across the 8 prompts of the circuit's task
    _choose(d, "head-rank-set", "circuit · ioi-toy")
    d.find_element(By.ID, "head-rank").click()
    _wait(d, "#head-ranked", text="over 8 prompts", timeout=60)
    rows = d.find_elements(By.CSS_SELECTOR, "#head-ranked-table tbody tr")
    links = [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows]
    assert len(rows) == 15 and all(link.startswith("circuit ioi-toy #") for link in links)
    _settle(d)
    _screenshot(d, "head-ranked", "#head-ranked")

    # Atlas of a toy model scanned on prose: most tokens are <unk>, and the page says so
    d.get(server + "/atlas?run=toy-prose.h5")
    warning = _wait(d, ".warning-panel", timeout=60).text
    assert "unknown token" in warning and "toy-ioi" in warning

    # Compare: same model on two prompt sets, one colour scale and the difference; label flips
    # only between the same score
    d.get(server + "/compare?a=a.h5&b=b.h5")
    _wait(d, "#compare-grid .heatmaplayer")
    _wait(d, "#compare-changes")
    assert "difference B − A" in d.find_element("id", "compare-grid").text
    assert "heads change label sink" in d.find_element(By.ID, "compare-views").text
    _settle(d)
    _page_fits(d)
    _screenshot(d, "compare")
    d.get(server + "/compare?a=a.h5&b=b.h5&score=sink&score_b=entropy")
    _wait(d, "#compare-changes")
    assert "counted only when both sides show the same score" in d.page_source

    # Circuit: directed graph by class, evidence, and a click on a node opens that head
    d.get(server + "/circuit?run=a.h5")
    _wait(d, "#circuit-graph .scatterlayer")
    assert "name mover" in d.find_element("id", "circuit-classes").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#circuit-graph .annotation-arrow-g")) == 3
    legend = d.find_element(By.CSS_SELECTOR, "#circuit-graph .legend").text
    assert "q path" in legend and "direct to logits" in legend
    assert "0.8" in d.find_element(By.ID, "circuit-evidence").text  # 1.2's DLA
    _settle(d)
    _page_fits(d)
    _screenshot(d, "circuit")
    _screenshot(d, "circuit-graph", "#circuit-graph")
    _click_scatter_point(d, "circuit-graph", [0, 3])
    _wait(d, "#head-title", text="Head L0 H3")
    # the circuit's ablations, launched into the lab
    d.get(server + "/circuit?run=toy-ioi.h5")
    _wait(d, "#circuit-ablate-complement").click()
    _wait(d, "#lab-heads")
    assert d.find_element(By.ID, "lab-heads").get_attribute("value") == (
        "0.0, 0.2, 0.3, 1.0, 1.2, 1.3"
    )
    control = d.find_element(By.CSS_SELECTOR, "#lab-control input")
    assert not control.is_selected()  # the complement leaves no heads for a random control
    d.get(server + "/circuit?run=toy-ioi.h5")
    _wait(d, "#circuit-ablate").click()
    _wait(d, "#lab-heads")
    assert d.find_element(By.ID, "lab-heads").get_attribute("value") == "0.1, 1.1"

    # Intervention lab on toy-ioi: zero its name mover 1.1 (its card: accuracy drops by 0.56,
    # random heads by 0.01). The page defines the metrics; a background job reports progress;
    # the result shows each metric with and without, the CI and the matched random control,
    # each on its own axis, and is stored in the run file.
    d.get(server + "/lab?run=toy-ioi.h5&heads=1.1")
    definitions = _wait(d, "#lab-metrics", text="argmax over the whole vocabulary").text
    assert "logit_diff" in definitions and "paired bootstrap" in definitions
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
    figures = d.find_elements(By.CSS_SELECTOR, "#lab-figure .js-plotly-plot")
    assert [f.find_element(By.CSS_SELECTOR, ".gtitle").text for f in figures] == [
        "accuracy (95% CI)",
        "logit_diff (95% CI)",
    ]  # one axis per metric
    # the tiny Llama (a.h5's views) and toy-ioi: 2 loads in this server
    assert "model loads in this server process so far: 2" in d.page_source
    assert d.find_element("id", "lab-go").is_enabled()
    stored = _wait(d, "#lab-stored-table", text="zero 1.1 on toy (evaluate)").text
    assert f"Δ accuracy {accuracy_diff:+.4f}" in stored
    _settle(d)
    _page_fits(d)
    _screenshot(d, "lab")
    _screenshot(d, "lab-result", "#lab-result")

    # a sweep: every head alone, as a layer × head heatmap per metric
    d.find_element(By.CSS_SELECTOR, "#lab-mode input[value=sweep]").click()
    d.find_element(By.ID, "lab-go").click()
    _wait(d, "#lab-summary", timeout=180, text="on each of 8 heads alone")
    sweeps = d.find_elements(By.CSS_SELECTOR, ".sweep-graph .heatmaplayer")
    assert len(sweeps) == 2  # accuracy and logit_diff
    top = d.find_element(By.CSS_SELECTOR, ".sweep-top tbody tr").text
    assert top.startswith("1.1 ")  # the name mover matters most for accuracy
    _settle(d)
    _screenshot(d, "lab-sweep")
    _screenshot(d, "lab-sweep-grid", ".sweep-graph")

    # a cancelled job says so, and stores nothing
    n_stored = len(d.find_elements(By.CSS_SELECTOR, "#lab-stored-table tbody tr"))
    examples = d.find_element(By.ID, "lab-n")
    examples.clear()
    examples.send_keys("512")
    d.find_element(By.ID, "lab-go").click()
    WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "lab-cancel").is_enabled())
    _wait(d, "#lab-progress-text", text="/576 batches scored")  # 64 batches × (1 + 8) groups
    d.find_element(By.ID, "lab-cancel").click()
    assert "Cancelled" in _wait(d, "#lab-cancelled").text
    assert d.find_element(By.ID, "lab-progress-text").text == "cancelled"
    time.sleep(2)
    assert len(d.find_elements(By.CSS_SELECTOR, "#lab-stored-table tbody tr")) == n_stored
    _screenshot(d, "lab-cancelled", "#lab-cancelled")

    # after a restart (a new server process on the same runs directory) the results are still
    # listed, can be shown again and downloaded
    with _serve(runs_dir, tmp_path / "restarted.log") as again:
        d.get(again + "/lab?run=toy-ioi.h5")
        assert "(sweep)" in _wait(d, "#lab-stored-table", text="zero 1.1 on toy (evaluate)").text

        def evaluated_row():
            table = _wait(d, "#lab-stored-table")
            rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
            return next(r for r in rows if "(evaluate)" in r.text)

        evaluated_row().find_element(By.XPATH, ".//button[text()='show']").click()
        assert "toy: 32 examples" in _wait(d, "#lab-summary").text
        _settle(d)  # the list is drawn again under the result shown
        evaluated_row().find_element(By.XPATH, ".//button[text()='download JSON']").click()
        result = json.loads(_downloaded("evaluate_.json").read_text())
        assert result["mode"] == "evaluate" and result["task"] == "toy"
        assert result["interventions"] == [{"kind": "zero", "heads": [[1, 1]]}]
        assert result["table"]["accuracy"]["diff"] == pytest.approx(accuracy_diff, abs=1e-4)

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
