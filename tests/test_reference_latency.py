"""Reference-only latencies (issue #14): a method declares whether its latency is representative of an
optimized implementation (``Stage.reference_latency``); spec.json carries it, and `lcbench report` and
the leaderboard mark such latencies (§) with a footnote so nobody ranks methods on them."""

from __future__ import annotations

import inspect
import json
import re

from rich.console import Console
from test_leaderboard import browser  # noqa: F401  (the headless Chromium fixture)
from test_throughput_report import batched_runs

from lcbench.methods.registry import builtin_methods, describe_component
from lcbench.report.build import build_report
from lcbench.report.leaderboard import build_leaderboard
from lcbench.report.throughput import REFERENCE_NOTE

# decided per method from its code (the one-line reason sits on each class); methods added later declare
# their own (e.g. the context-retrieval frame's), and every one that does must say why
REFERENCE = {"ashape", "block_topk", "dilated", "flexprefill", "hyperattention", "int4", "int8", "kivi", "minference",
             "quest", "tri_mix", "trishape", "vertical_slash", "xattention"}
REPRESENTATIVE = {"full", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "streamingllm", "knorm", "expected_attention",
                  "think", "criticalkv", "pool", "kvmerge", "truncate", "llmlingua", "llmlingua2", "selective_context"}


def test_each_method_declares_it_and_the_reference_ones_say_why():
    methods = builtin_methods()
    assert all(isinstance(cls.reference_latency, bool) for cls in methods.values())
    marked = {n for n, cls in methods.items() if cls.reference_latency}
    assert REFERENCE <= marked and not (REPRESENTATIVE & marked)
    for name in marked:
        owner = next(c for c in methods[name].__mro__ if "reference_latency" in c.__dict__)
        source = inspect.getsource(owner)
        assert re.search(r"# reference: .+\n(\s+#.*\n)*\s+reference_latency = True", source), owner


def test_spec_json_describes_it():
    assert describe_component("kivi")["reference_latency"] is True
    assert describe_component("snapkv")["reference_latency"] is False
    specs = {json.loads(p.read_text())["spec"]["method"][0]["name"]: json.loads(p.read_text())["methods"]
             for p in batched_runs().glob("batch-turns/*/spec.json")}
    assert specs["kivi"][0]["reference_latency"] is True and specs["full"][0]["reference_latency"] is False


def test_report_marks_reference_latencies_with_a_footnote():
    console = Console(record=True, width=300)
    build_report([batched_runs() / "batch-turns"], console, plots=False)
    text = console.export_text()
    table = text.split("score per task")[0]
    rows = {m: line for line in table.splitlines() for m in ("full", "kivi") if f"│ {m} " in line}
    cells = [c.strip() for c in rows["kivi"].split("│")]
    # TTFT s, compress s, tok/s marked; score, KV MB, peak memory not
    assert sum(c.endswith("§") for c in cells) == 3 and not any(c.endswith("§") for c in cells[:8])
    assert "§" not in rows["full"]
    assert " ".join(REFERENCE_NOTE.split()[:6]) in " ".join(table.split())


def test_leaderboard_marks_them_in_chromium(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    index = build_leaderboard([batched_runs()], tmp_path / "site")
    browser.get(index.as_uri())
    table = browser.find_element(By.ID, "runs-table")
    heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    col = {name: heads.index(name) + 1 for name in ("method", "TTFT s", "compress s", "text s", "decode tok/s", "KV MB")}
    seen = set()
    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        cell = {k: row.find_element(By.CSS_SELECTOR, f"td:nth-child({i})").text for k, i in col.items()}
        seen.add(cell["method"])
        marked = cell["method"] == "kivi"
        for k in ("TTFT s", "compress s", "decode tok/s"):
            assert cell[k].endswith("§") == marked, (cell, k)
        assert not cell["KV MB"].endswith("§") and not cell["text s"].endswith("§")
    assert seen == {"full", "kivi"}
    assert "a reference implementation's latency" in browser.find_element(By.CSS_SELECTOR, ".reference-note").text
    # the throughput table: kivi's tok/s and samples/s marked, full's not
    rows = browser.find_elements(By.CSS_SELECTOR, "#throughput-table tbody tr")
    assert sorted((r.get_attribute("data-method"), r.find_element(By.CSS_SELECTOR, "td:nth-child(5)").text)
                  for r in rows) == [("full", "1"), ("full", "3"), ("kivi", "1"), ("kivi", "3")]
    for r in rows:
        marked = r.get_attribute("data-method") == "kivi"
        assert r.find_element(By.CSS_SELECTOR, "td.tok-s").text.endswith("§") == marked
        assert r.find_element(By.CSS_SELECTOR, "td.samples-s").text.endswith("§") == marked
    (kivi_page,) = (tmp_path / "site" / "methods").glob("*kivi*.html")
    browser.get(kivi_page.as_uri())
    assert "latency: reference implementation" in browser.find_element(By.CSS_SELECTOR, ".reference-latency").text
