"""`lcbench leaderboard`: a static site that works from disk, ranks methods, keeps provenance and
escapes every string from results; checked in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import escape
from test_report_fixtures import tiny_runs, write_run

from lcbench.errors import UserError
from lcbench.report.leaderboard import build_leaderboard
from lcbench.report.reproduce import run_command

XSS_METHOD = "<script>alert(1)</script>"
XSS_MODEL = '"><img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Runs: full, snapkv (0.5, 0.75), h2o (0.5, 0.75: keeps 95 % of full up to r=0.55), streamingllm (0.5 only),
    a method and a model named as attacks."""
    tmp_path = tmp_path_factory.mktemp("leaderboard")
    runs = tmp_path / "runs"
    write_run(runs, [1, 1, 1, 1], method="full", ratio=0.0)
    write_run(runs, [1, 1, 0, 1], method="snapkv", ratio=0.5, metas=[{"depth": d} for d in (0, 50, 100, 50)])
    write_run(runs, [1, 0, 0, 1], method="snapkv", ratio=0.75)
    write_run(runs, [1, 1, 1, 0], method="streamingllm", ratio=0.5)
    write_run(runs, [1, 1, 1, 1], method="h2o", ratio=0.5)
    write_run(runs, [1, 0, 1, 1], method="h2o", ratio=0.75)
    write_run(runs, [0, 1, 0, 0], method=XSS_METHOD, ratio=0.5, predictions=["</script><script>alert(2)</script>"] * 4)
    write_run(runs, [0, 1, 0, 0], method=XSS_METHOD, ratio=0.75)
    write_run(runs, [1, 0], method="snapkv", ratio=0.5, model=XSS_MODEL)
    index = build_leaderboard([runs], tmp_path / "site")
    return index


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]
        self.scripts += tag == "script" and ("type", "application/json") not in attrs


def test_site_is_self_contained_and_every_link_resolves(site):
    root = site.parent
    pages = sorted(root.glob("**/*.html"))
    assert len(pages) == 1 + 5 + 9  # index, 5 methods (full, snapkv, h2o, streamingllm, the attack name), 9 runs
    for page in pages:
        text = page.read_text()
        assert "http://" not in text and "https://" not in text  # nothing to fetch
        parser = Links()
        parser.feed(text)
        assert parser.scripts == 1  # only the site's own inline script
        for url in parser.urls:
            target = url.split("#")[0]
            if target:
                assert (page.parent / target).resolve().exists(), (page.name, url)
    # per model: score vs ratio, latency/memory, equal memory; one needle heatmap
    assert len(list((root / "plots").glob("*.png"))) == len(list((root / "plots").glob("*.svg"))) == 2 + 2 + 2 + 1
    snapkv_run = next((root / "runs").glob("*snapkv__r0.5__tiny*.html")).read_text()
    assert "needle heatmap" in snapkv_run  # the run with depths in its meta has its heatmap


def test_strings_from_results_are_escaped_everywhere(site):
    root = site.parent
    for page in root.glob("**/*.html"):
        text = page.read_text()
        assert "<script>alert" not in text and "<img src=x" not in text, page.name
    index = site.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    embedded = re.search(r'<script type="application/json" id="lcbench-data">(.*?)</script>', index, re.S).group(1)
    assert "<" not in embedded and "\\u003cscript\\u003e" in embedded
    data = json.loads(embedded)
    assert {d["method"] for d in data} >= {XSS_METHOD, "snapkv"}
    assert json.loads((root / "data.json").read_text()) == data


def test_rankings_at_fixed_ratios(site):
    index = site.read_text()
    section = index.split('id="rank__niah__tiny-random-llama-')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td data-v=\"(\d*)\">.*?<a href=\"methods/[^\"]+\">([^<]+)</a>", section, re.S)
    # h2o mean(1, 0.75) > snapkv mean(0.75, 0.5) = 0.625 > attack mean(0.25, 0.25); streamingllm lacks r=0.75
    assert rows == [("1", "h2o"), ("2", "snapkv"), ("3", "&lt;script&gt;alert(1)&lt;/script&gt;"), ("", "streamingllm")]
    assert "full</a> (reference)" in section


def _stored_command(runs_root: Path, pattern: str) -> str:
    """The command of the run whose folder matches ``pattern``, from its spec.json."""
    payload = json.loads(next(runs_root.glob(f"{pattern}/spec.json")).read_text())
    return run_command(payload["spec"]).text


def test_every_run_carries_the_command_of_its_stored_spec(site):
    root = site.parent
    runs_root = root.parent / "runs"
    data = json.loads((root / "data.json").read_text())
    for entry in data:
        folder = next(p for p in runs_root.iterdir() if json.loads((p / "spec.json").read_text())["run_id"] == entry["run_id"])
        assert entry["command"] == run_command(json.loads((folder / "spec.json").read_text())["spec"]).text
    h2o = _stored_command(runs_root, "*h2o__r0.75*")
    assert h2o.startswith("lcbench run --model tiny-random-llama ") and "--method h2o " in h2o and "--ratio 0.75 " in h2o
    page = next((root / "runs").glob("*h2o__r0.75*.html")).read_text()
    assert f'<code id="reproduce-command">{escape(h2o)}</code>' in page
    index = site.read_text()
    assert f'title="{escape(h2o)}"' in index  # the ranking's score and achieved cells of that run


def test_equal_memory_and_95_summary_sections(site):
    index = site.read_text()
    section = index.split('id="memory__niah__tiny-random-llama-', 1)[1].split("</table>")[0]
    kv = [float(v) for v in re.findall(r'<tr title="reproduce: [^"]*"><td data-v="([^"]+)">', section)]
    assert kv == sorted(kv) and len(kv) == 8  # every run of the task and model but the other model's, by bytes
    assert "equal_memory__niah__tiny-random-llama" in section  # its plot
    table = index.split('id="retention-table"')[1].split("</table>")[0]
    h2o = table.split('data-method="h2o"')[1].split("</tr>")[0]
    assert '<td class="r95" data-v="0.55">0.550</td>' in h2o and '<td class="ci">[0.517, ≥0.75]</td>' in h2o
    streaming = table.split('data-method="streamingllm"')[1].split("</tr>")[0]
    assert "not reached (&lt; 0.5, the smallest ratio run" in streaming
    other_model = [row for row in table.split("<tr ")[1:] if "&#34;&gt;&lt;img" in row]
    assert len(other_model) == 1 and "– (no full run" in other_model[0]  # no full run of that model


def test_method_and_run_pages_carry_paper_parameters_and_provenance(site):
    root = site.parent
    snapkv = next(p for p in (root / "methods").glob("method__snapkv-*.html")).read_text()
    assert "SnapKV: LLM Knows What You are Looking for Before Generation" in snapkv
    assert "window_size" in snapkv and "kernel_size" in snapkv
    attack = [p.read_text() for p in (root / "methods").glob("*.html")]
    attack = next(t for t in attack if "<h1>Method: &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in t)
    assert "Not registered" in attack
    run_page = next((root / "runs").glob("*snapkv__r0.75*.html")).read_text()
    for needle in ("git revision", "transformers", "cpu_threads", "&#34;task_template_hash&#34;", "answer 3"):
        assert needle in run_page


def test_rebuild_replaces_own_output_and_refuses_foreign_folder(tmp_path):
    runs = write_run(tmp_path / "runs", [1, 0])
    root = build_leaderboard([runs], tmp_path / "site").parent
    (root / "plots" / "stale.png").write_bytes(b"x")
    build_leaderboard([runs], root)
    assert not (root / "plots" / "stale.png").exists() and (root / "index.html").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not written by `lcbench leaderboard`"):
        build_leaderboard([runs], foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_builds_from_real_tiny_runs(tmp_path):
    index = build_leaderboard(list(tiny_runs()), tmp_path / "site")
    text = index.read_text()
    assert "snapkv" in text and "tiny-random-llama" in text
    assert len(list((tmp_path / "site" / "runs").glob("*.html"))) == 2


# --- a real browser ---------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture()
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lcbench-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1300,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_browser_renders_sorts_filters_and_runs_no_injected_script(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(site.as_uri())
    assert browser.title == "lcbench leaderboard"
    shot = Path(tempfile.gettempdir()) / "lcbench-leaderboard-test.png"  # kept for a look
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert _no_alert(browser) and browser.execute_script("return window.__pwned === undefined")
    images = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert images and all(browser.execute_script("return arguments[0].naturalWidth", im) > 100 for im in images)

    table = browser.find_element(By.ID, "runs-table")
    methods = [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(3)")]
    assert XSS_METHOD in methods  # shown as text

    def column(i):
        return [td.get_attribute("data-v") for td in table.find_elements(By.CSS_SELECTOR, f"tbody tr td:nth-child({i})")]

    score_head = table.find_elements(By.CSS_SELECTOR, "thead th")[5]
    score_head.click()
    asc = [float(v) for v in column(6)]
    assert asc == sorted(asc) and score_head.get_attribute("aria-sort") == "ascending"
    score_head.click()
    desc = [float(v) for v in column(6)]
    assert desc == sorted(desc, reverse=True) and desc[0] == 1.0
    method_head = table.find_elements(By.CSS_SELECTOR, "thead th")[2]
    method_head.click()
    names = [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(3)")]
    assert names == sorted(names, key=str.lower)

    ranking = browser.find_element(By.XPATH, "//table[contains(@class, 'ranking')][.//tr[contains(@class, 'reference')]]")
    for _ in range(2):  # either direction: the uncompressed reference row stays first
        ranking.find_elements(By.CSS_SELECTOR, "thead th")[-1].click()
        first = ranking.find_element(By.CSS_SELECTOR, "tbody tr")
        assert "reference" in first.get_attribute("class") and "(reference)" in first.text

    box = browser.find_element(By.CSS_SELECTOR, 'input[data-filter="runs-table"]')
    box.send_keys("streamingllm")
    visible = [r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if r.is_displayed()]
    assert len(visible) == 1 and "streamingllm" in visible[0].text
    assert browser.find_element(By.ID, "runs-table-count").text == "1 shown"

    browser.get(site.as_uri())  # unfiltered again
    # the equal-memory view: its plot is drawn and its table lists runs in order of measured bytes
    memory = browser.find_element(By.CSS_SELECTOR, "table.equal-memory[id^='memory__niah__tiny-random-llama']")
    assert memory.is_displayed() and len(memory.find_elements(By.CSS_SELECTOR, "tbody tr")) == 8
    plot = browser.find_element(By.CSS_SELECTOR, "#equal-memory ~ figure img[src*='equal_memory__niah__tiny']")
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 100
    kv = [float(td.get_attribute("data-v")) for td in memory.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(1)")]
    assert kv == sorted(kv)
    # the 95 % summary row of a method, as shown
    row = browser.find_element(By.CSS_SELECTOR, '#retention-table tr[data-method="h2o"]')
    assert row.find_element(By.CSS_SELECTOR, "td.r95").text == "0.550"
    assert row.find_element(By.CSS_SELECTOR, "td.ci").text == "[0.517, ≥0.75]"
    # a reproduce command, visible, equal to the one its spec.json gives
    expected = _stored_command(site.parent.parent / "runs", "*h2o__r0.75*")
    (cell,) = [d for d in browser.find_elements(By.CSS_SELECTOR, "#runs-table details.cmd")
               if "h2o__r0.75" in d.find_element(By.CSS_SELECTOR, "code").get_attribute("data-run")]
    code = cell.find_element(By.CSS_SELECTOR, "code")
    assert not code.is_displayed()  # folded in the table of all runs
    cell.find_element(By.TAG_NAME, "summary").click()
    assert code.is_displayed() and code.text == expected
    (shown,) = [c for c in browser.find_elements(By.CSS_SELECTOR, "table.equal-memory code.cmd")
                if "h2o__r0.75" in c.get_attribute("data-run")]
    assert shown.is_displayed() and shown.text == expected  # shown as it is in the equal-memory table
    browser.get(next((site.parent / "runs").glob("*h2o__r0.75*.html")).as_uri())
    assert browser.find_element(By.ID, "reproduce-command").text == expected

    for page in sorted(site.parent.glob("*/*.html")):
        browser.get(page.as_uri())
        assert _no_alert(browser) and browser.execute_script("return window.__pwned === undefined"), page.name


def test_method_pages_describe_methods_from_the_stored_specs(tmp_path):
    """The site reads a method's description from its runs' spec.json, never from the installation
    that builds it: a stored description shows even where this lcbench would describe it otherwise."""
    folder = write_run(tmp_path / "runs", [1, 0], method="snapkv")
    payload = json.loads((folder / "spec.json").read_text())
    assert payload["methods"][0]["name"] == "snapkv" and "SnapKV" in payload["methods"][0]["paper"]
    payload["methods"][0]["paper"] = "The paper as stored with the run"
    (folder / "spec.json").write_text(json.dumps(payload))
    root = build_leaderboard([tmp_path / "runs"], tmp_path / "site").parent
    page = next((root / "methods").glob("method__snapkv-*.html")).read_text()
    assert "The paper as stored with the run" in page and "LLM Knows What You are Looking for" not in page


EXAMPLE = Path(__file__).resolve().parents[1] / "leaderboard"


def test_browser_example_site_shows_equal_memory_the_95_summary_and_reproducible_commands(browser):
    """The committed example site (leaderboard/, built from real SmolLM2 runs): its equal-memory plot
    and table, the 95 % summary row of snapkv agreeing with the run scores in its data.json, and
    each run page's command equal to the one its resolved spec (shown on the same page) gives."""
    from selenium.webdriver.common.by import By

    from lcbench.report.retention import crossing

    index = EXAMPLE / "index.html"
    assert index.exists(), "the committed example site (leaderboard/index.html) is missing"
    data = json.loads((EXAMPLE / "data.json").read_text())
    browser.get(index.as_uri())
    memory = browser.find_element(By.CSS_SELECTOR, "table.equal-memory")
    rows = memory.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) >= 5 and memory.is_displayed()
    kv = [float(r.find_element(By.CSS_SELECTOR, "td").get_attribute("data-v")) for r in rows]
    assert kv == sorted(kv)
    families = {r.find_elements(By.CSS_SELECTOR, "td")[3].text for r in rows}
    assert {"kv_dropping", "kv_quantization", "baseline"} <= families and any("+" in f for f in families)
    plot = browser.find_element(By.CSS_SELECTOR, "#equal-memory ~ figure img[src*='equal_memory__']")
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 100

    row = browser.find_element(By.CSS_SELECTOR, '#retention-table tr[data-method="snapkv"]')
    task = row.find_elements(By.CSS_SELECTOR, "td")[0].text
    runs = [d for d in data if d["task_label"] == task]
    full = next(d for d in runs if d["method"] == "full")["overall"]["score"]
    points = [(d["ratio"], d["overall"]["score"]) for d in runs if d["method"] == "snapkv"]
    assert row.find_element(By.CSS_SELECTOR, "td.r95").text == crossing(points, full).text()
    assert row.find_element(By.CSS_SELECTOR, "td.ci").text.startswith("[")

    for entry in data:
        browser.get((EXAMPLE / entry["page"]).as_uri())
        spec = json.loads(browser.find_element(By.CSS_SELECTOR, "#reproduce ~ pre + h3 + pre").text)
        shown = browser.find_element(By.ID, "reproduce-command").text
        assert shown == run_command(spec).text == entry["command"]
        assert shown.startswith("lcbench run --model smollm2-135m-instruct ")
