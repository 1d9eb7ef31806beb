"""A loopback stand-in for the Hugging Face hub's file endpoint and for the essay sources, for
tests that drive the *real* clients (huggingface_hub's ``hf_hub_download``, urllib) against it.

Hub semantics follow huggingface_hub's ``file_download.py`` / ``utils/_http.py`` (2.x):
``HEAD|GET /datasets/<repo>/resolve/<revision>/<file>`` answers like an LFS file on the hub — a
302 whose ``Location`` points at another host (``localhost`` instead of ``127.0.0.1``, i.e. a
"CDN" the client must not follow on HEAD), with ``X-Repo-Commit``, ``X-Linked-Etag`` (the
sha256), ``X-Linked-Size`` and ``ETag``; the client then GETs the ``Location`` (200 with
``Content-Length`` and ``ETag``). Unknown revisions, files and repositories get 404 with the
``X-Error-Code`` the hub sends (``RevisionNotFound``, ``EntryNotFound``, ``RepoNotFound``).
``hub_like=False`` drops ``X-Repo-Commit``, as a non-hub server would. Model repos resolve the same
at ``/<repo>/resolve/…``; ``snapshot_download``'s two listings are answered for every repo:
``/api/{datasets,models}/<repo>/revision/<rev>`` (the commit and the files) and ``…/tree/<rev>``
(each file's path, size and oid; huggingface_hub 2.x ``hf_api``).

Essay mirror (``LCBENCH_MIRROR``): ``/<host>/<path>`` serves ``files[(host, path)]``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str
    branches: tuple[str, ...] = ("main",)


@dataclass
class StandIn:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    mirror: dict[tuple[str, str], bytes] = field(default_factory=dict)
    hub_like: bool = True
    log: list[tuple[str, str]] = field(default_factory=list)

    def start(self) -> "StandIn":
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                stand_in.answer(self, body=False)

            def do_GET(self):
                stand_in.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- answers ------------------------------------------------------------------------
    def _send(self, h, status: int, headers: dict[str, str], body: bytes, with_body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if with_body:
            h.wfile.write(body)

    def answer(self, h, body: bool) -> None:
        path = h.path.split("?", 1)[0]
        self.log.append((h.command, path))
        parts = path.lstrip("/").split("/")
        if parts[:1] == ["datasets"] and "resolve" in parts:
            return self._resolve(h, parts, body)
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("datasets", "models"):
            return self._listing(h, "/".join(parts[2:4]), parts[4], parts[5], body)
        if "resolve" in parts and parts[0] not in ("cdn", "api") and "/".join(parts[:2]) in self.repos:
            return self._resolve(h, ["models", *parts], body)
        if parts[:1] == ["cdn"]:
            for repo in self.repos.values():
                for data in repo.files.values():
                    if hashlib.sha256(data).hexdigest() == parts[1]:
                        return self._send(h, 200, {"ETag": f'"{parts[1]}"', "Content-Type": "application/zip"},
                                          data, body)
            return self._send(h, 404, {}, b"no such blob", body)
        key = (parts[0], "/".join(parts[1:]))
        if key in self.mirror:
            return self._send(h, 200, {"Content-Type": "text/plain"}, self.mirror[key], body)
        return self._send(h, 404, {}, b"not found", body)

    def _listing(self, h, repo_id: str, kind: str, revision: str, body: bool) -> None:
        """``snapshot_download``'s repo info at a revision (``kind`` revision) or file tree (tree)."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"", body)
        if revision != repo.commit and revision not in repo.branches:
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound"}, b"", body)
        if kind == "revision":
            data = {"id": repo_id, "sha": repo.commit, "siblings": [{"rfilename": f} for f in repo.files]}
        else:
            data = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in repo.files.items()]
        return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(data).encode(), body)

    def _resolve(self, h, parts: list[str], body: bool) -> None:
        i = parts.index("resolve")
        repo_id, revision, filename = "/".join(parts[1:i]), parts[i + 1], "/".join(parts[i + 2:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                              b"", body)
        if revision != repo.commit and revision not in repo.branches:
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"},
                              b"", body)
        if filename not in repo.files:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit,
                                       "X-Error-Message": "Entry not found"}, b"", body)
        data = repo.files[filename]
        sha = hashlib.sha256(data).hexdigest()
        headers = {"Location": f"http://localhost:{self.port}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        if self.hub_like:
            headers["X-Repo-Commit"] = repo.commit
        return self._send(h, 302, headers, b"", body)
