"""Every suite's first-use download through the real clients, with no --data-dir: huggingface_hub's
``hf_hub_download`` fetches LongBench's ``data.zip`` from a loopback stand-in for the hub
(:mod:`hubserver`, ``HF_ENDPOINT``), and RULER's and NIAH's essays come from a loopback mirror of
github.com / paulgraham.com (``LCBENCH_MIRROR``). A second round runs with the server stopped and
must be served from the caches (nothing like ``HF_HUB_OFFLINE`` set). The errors name the real cause."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from hubserver import HubRepo, StandIn

from lcbench.results import read_records
from lcbench.tasks import essays
from lcbench.tasks.longbench import data as lb_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
LCBENCH = shutil.which("lcbench")
REPO_ID, COMMIT = "zai-org/LongBench", lb_data.default_revision()


def released_zip() -> bytes:
    """LongBench's data.zip layout (``data/<config>.jsonl``) built from the shared MiniLongBench rows:
    trec's rows sit at the indices MiniLongBench maps them to; the rows between are copies of them."""
    rows = [json.loads(line) for line in (SHARED / "minilongbench" / "minilongbench_237.jsonl").open()]
    trec = sorted((r for r in rows if r["dataset"] == "trec"), key=lambda r: r["longbench_row_assumed"])
    fields = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")

    def released(r, i):
        out = {k: r.get(k) for k in fields}
        out.update(length=r.get("length") or len(r["context"].split()), language="en", _id=f"standin-trec-{i}")
        return out

    by_index = {r["longbench_row_assumed"]: r for r in trec}
    last = max(by_index)
    lines = [json.dumps(released(by_index.get(i, trec[i % len(trec)]), i)) for i in range(last + 1)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("data/trec.jsonl", "\n".join(lines) + "\n")
        z.writestr("data/trec_e.jsonl", "\n".join(lines[:3]) + "\n")
    return buf.getvalue()


def essay_mirror() -> dict[tuple[str, str], bytes]:
    """RULER's 218 URLs and NIAH's 49 pinned files: the gkamradt essays from ../shared, and a stand-in
    page (one ``<font>`` element, as paulgraham.com's) for each paulgraham.com URL."""
    folder = SHARED / "niah" / "PaulGrahamEssays"
    out = {}
    for url in essays.ruler_urls():
        host, _, path = url.split("://", 1)[1].partition("/")
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".html"):
            body = f"<html><body><font size=2>Stand-in essay {name}.<br><br>It has two paragraphs.</font></body></html>"
            out[host, path] = body.encode("ascii")
        else:
            out[host, path] = (folder / name).read_bytes()
    m = essays.niah_manifest()
    for f in m["files"]:
        url = m["raw_url"].format(repo=m["repo"], commit=m["commit"], folder=m["folder"], name=f["name"])
        host, _, path = url.split("://", 1)[1].partition("/")
        out[host, path] = (folder / f["name"]).read_bytes()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The stand-in server and a process environment pointing every cache at fresh folders."""
    root = tmp_path_factory.mktemp("hub")
    server = StandIn(repos={REPO_ID: HubRepo({"data.zip": released_zip()}, COMMIT)}, mirror=essay_mirror()).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LCBENCH_"))}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(root / "hf"), LCBENCH_CACHE=str(root / "lcbench"),
               LCBENCH_DATA=str(root / "no_local_data"), LCBENCH_MIRROR=server.endpoint, COLUMNS="250",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    yield server, env, root
    if server.thread.is_alive():
        server.stop()


def lcbench(env, out: Path, task: str, task_args: str, *extra: str) -> subprocess.CompletedProcess:
    assert LCBENCH, "the lcbench console script is not installed"
    return subprocess.run([LCBENCH, "run", "--model", "tiny-random-llama", "--task", task, "--task-args", task_args,
                           "--limit", "1", "--output-path", str(out), *extra], env=env, capture_output=True,
                          text=True, timeout=600)


def records(out: Path) -> list[dict]:
    return read_records(next(out.glob("*/samples.jsonl")).parent)


RUNS = {  # task → task arguments (one small sample each)
    "longbench": "datasets=trec,n_per_dataset=1",
    "minilongbench": "datasets=trec,n_per_dataset=1",
    "ruler": "tasks=niah_single_2,lengths=700",
    "niah": "lengths=500,depths=50",
}


def test_first_use_downloads_then_the_cache_serves_with_the_server_stopped(world):
    server, env, root = world
    for task, args in RUNS.items():
        proc = lcbench(env, root / f"online-{task}", task, args)
        assert proc.returncode == 0, (task, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
    hits = [(m, p) for m, p in server.log if p.startswith(("/datasets", "/cdn"))]
    assert ("HEAD", f"/datasets/{REPO_ID}/resolve/{COMMIT}/data.zip") in hits
    assert [m for m, p in hits if p.startswith("/cdn")] == ["GET"]  # one download; minilongbench used the cache
    spec = json.loads(next((root / "online-longbench").glob("*/spec.json")).read_text())["spec"]
    assert spec["task_args"]["revision"] == COMMIT and spec["task_args"]["data_dir"] is None
    assert records(root / "online-longbench")[0]["meta"]["_id"].startswith("standin-trec-")
    assert records(root / "online-minilongbench")[0]["meta"]["dataset"] == "trec"
    ruler = records(root / "online-ruler")[0]["meta"]
    assert ruler["haystack_source"] == "download" and len(ruler["haystack_sha256"]) == 64
    cached = json.loads((root / "lcbench" / "data" / "ruler" / "PaulGrahamEssays.source.json").read_text())
    assert cached["missing"] == [] and cached["urls"] == 218 and cached["sha256"] == ruler["haystack_sha256"]
    text = json.loads((root / "lcbench" / "data" / "ruler" / "PaulGrahamEssays.json").read_text())["text"]
    assert text.startswith((SHARED / "niah" / "PaulGrahamEssays" / "addiction.txt").read_text())  # repo files first
    assert "Stand-in essay 13sentences.html." in text and "<font" not in text  # pages through html2text
    niah = records(root / "online-niah")[0]["meta"]
    assert niah["dataset"] == "niah" and niah["haystack"] == "essays" and niah["haystack_source"] == "download"
    assert niah["haystack_sha256"] == essays.folder_sha256(SHARED / "niah" / "PaulGrahamEssays")

    server.stop()  # the second round: no server, no offline variable
    for task, args in RUNS.items():
        proc = lcbench(env, root / f"offline-{task}", task, args)
        assert proc.returncode == 0, (task, proc.stderr[-3000:])
    assert records(root / "offline-ruler")[0]["meta"]["haystack_source"] == "cache"
    assert records(root / "offline-niah")[0]["meta"]["haystack_source"] == "cache"
    online, offline = records(root / "online-longbench")[0], records(root / "offline-longbench")[0]
    assert online["prediction"] == offline["prediction"] and online["meta"]["_id"] == offline["meta"]["_id"]


def _user_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Offline?" not in proc.stderr
    return " ".join(proc.stderr.split())


def test_errors_name_the_cause(world, tmp_path):
    _, env, _ = world
    fresh = {**env, "HF_HOME": str(tmp_path / "hf"), "LCBENCH_CACHE": str(tmp_path / "lc")}
    repos = {REPO_ID: HubRepo({"data.zip": b"PK"}, COMMIT)}
    hub = StandIn(repos=repos).start()
    try:
        wrong = "0" * 40
        msg = _user_error(lcbench({**fresh, "HF_ENDPOINT": hub.endpoint}, tmp_path / "a", "longbench",
                                  f"datasets=trec,revision={wrong}"))
        assert f"revision '{wrong}' does not exist" in msg and "revision=" in msg
    finally:
        hub.stop()
    plain = StandIn(repos=repos, hub_like=False).start()
    try:
        msg = _user_error(lcbench({**fresh, "HF_ENDPOINT": plain.endpoint}, tmp_path / "b", "longbench",
                                  "datasets=trec"))
        assert "did not answer like the Hugging Face hub" in msg and "HF_ENDPOINT" in msg
    finally:
        plain.stop()
    gone = StandIn().start()
    gone.stop()  # a port nobody listens on
    msg = _user_error(lcbench({**fresh, "HF_ENDPOINT": gone.endpoint}, tmp_path / "c", "longbench", "datasets=trec"))
    assert "is not in the HF cache" in msg and "could not be reached" in msg and "--data-dir" in msg
    msg = _user_error(lcbench({**fresh, "HF_HUB_OFFLINE": "1"}, tmp_path / "d", "ruler", "tasks=niah_single_2"))
    assert "HF_HUB_OFFLINE forbids downloading" in msg and "haystack=PATH" in msg
