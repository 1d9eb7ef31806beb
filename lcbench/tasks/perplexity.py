"""Perplexity under compression: long documents scored token by token (issue #17).

Each document is cut to ``length`` tokens of the target tokenizer; its first ``prefix`` tokens are
the *context part* (what a method compresses: prompt compression rewrites its text, cache stages
compress its KV, sparse prefill stages compute its attention), the rest the *continuation*, fed
teacher-forced on the compressed cache by :mod:`lcbench.engine.loglik` (decode-stage methods one
token at a time, evicting as they go). Every continuation token but the first is scored; its
negative log-likelihood is summed into buckets of ``bucket`` tokens by its *document position*
(position 0 is the document's first token), the view of StreamingLLM's Figure 3 and
``examples/eval_long_ppl.py`` (mit-han-lab/streaming-llm@2e50426: per-token NLL over the input
length, perplexity ``exp(mean NLL)`` pooled over every token of every text). A document's
``score`` is its perplexity; the run's (``aggregate``/``suite_score``) is pooled the same way,
``exp(Σ NLL / Σ tokens)`` over documents, per bucket and overall — not a mean of per-document
perplexities. (MInference's ``experiments/ppl/run_ppl.py``, microsoft/MInference@fb56c91, instead
truncates each book to lengths 1K…100K, scores every token in one dense or sparse forward and
averages per-book perplexities per length; here the prefix is compressed first and only the
continuation is scored, which is where methods that drop or quantize the cache differ.)

Lower is better: the task's mode is ``loglik`` (``lcbench.tasks.base.LOWER_IS_BETTER_MODES``).

Data: ``dataset=essays`` (offline) — upstream NIAH's Paul Graham essays (the local data folder,
lcbench's cache or a download: :func:`lcbench.tasks.essays.niah_essays`), read sorted by file name,
joined by blank lines and cut into consecutive ``length``-token documents; ``dataset=pg19`` —
PG-19 books from the hub (``repo`` ``emozilla/pg19``, the parquet copy of ``deepmind/pg19``, whose
loading script current ``datasets`` refuses), the ``split`` shards fetched with
``huggingface_hub.snapshot_download`` at ``revision`` into the HF cache, each book's first
``length`` tokens one document (books shorter than that skipped), in the shards' order; the commit
the revision resolved to is in every record's meta. ``data_dir`` points either at a local copy.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..params import Param
from . import essays
from .base import LOGLIK, Task, TaskEnv
from .sample import Sample, Turn

ESSAYS, PG19 = "essays", "pg19"
PG19_REPO = "emozilla/pg19"


def bucket_label(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


def _windows(tokenizer, text: str, length: int, prefix: int, limit: int | None) -> list[tuple[str, str]]:
    """(prefix text, continuation text) of consecutive ``length``-token windows of ``text``, split
    after ``prefix`` tokens — at character offsets of the target tokenizer (a fast tokenizer), so
    both parts are exact substrings of the text; else by decoding the token slices."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if offsets is None else enc["input_ids"]
    out = []
    for a in range(0, len(ids) - length + 1, length):
        if limit is not None and len(out) >= limit:
            break
        if offsets is not None:
            start, split, end = offsets[a][0], offsets[a + prefix][0], offsets[a + length - 1][1]
            out.append((text[start:split], text[split:end]))
        else:
            out.append((tokenizer.decode(ids[a:a + prefix]), tokenizer.decode(ids[a + prefix:a + length])))
    return out


class Perplexity(Task):
    name = "perplexity"
    suite = "perplexity"
    version = "1"
    mode = LOGLIK
    source = ("StreamingLLM examples/eval_long_ppl.py (mit-han-lab/streaming-llm@2e50426); PG-19 "
              "(Rae et al., arXiv:1911.05507) as emozilla/pg19; offline: NIAH's Paul Graham essays")
    summary = ("perplexity of a document's continuation teacher-forced on its compressed prefix, per position "
               "bucket (lower is better)")
    params = (
        Param("dataset", str, ESSAYS, "'essays' (offline: the Paul Graham essays) or 'pg19' (PG-19 books from the hub)",
              (ESSAYS, PG19)),
        Param("length", int, 4096, "tokens per document (target tokenizer)", min=3),
        Param("prefix", int, 1024, "tokens of the document compressed before the continuation is scored", min=1),
        Param("bucket", int, 1024, "width in tokens of the position buckets perplexity is reported in", min=1),
        Param("chunk", int, 512, "continuation tokens per teacher-forced pass (decode-stage methods: always 1)", min=1),
        Param("repo", str, PG19_REPO, "pg19: the hub dataset"),
        Param("revision", str, "main", "pg19: branch, tag or commit of the hub dataset (the commit used is recorded)"),
        Param("split", str, "test", "pg19: the split whose shards are read", ("test", "validation", "train")),
        Param("data_dir", str, None, "essays: a folder laid out like shared/data (niah/PaulGrahamEssays); pg19: a "
                                     "folder of the split's parquet files (a column 'text')"),
    )

    def __init__(self, **args: Any):
        super().__init__(**args)
        if self.args["prefix"] + 2 > self.args["length"]:
            raise UserError(f"perplexity: prefix={self.args['prefix']} leaves fewer than 2 continuation tokens in "
                            f"length={self.args['length']} (the first is fed, the rest scored). Fix: a prefix below "
                            f"length - 1, e.g. prefix={max(1, self.args['length'] // 4)}.")

    # --- data ---------------------------------------------------------------------------------
    def _texts(self, limit: int | None) -> tuple[list[str], dict[str, Any]]:
        """The source texts and what to record about them."""
        if self.args["dataset"] == ESSAYS:
            root = Path(self.args["data_dir"]) if self.args["data_dir"] else None
            found, why = essays.niah_essays(root)
            if found is None:
                raise UserError(f"perplexity: the Paul Graham essays could not be had: {why}. Fix: run once with "
                                f"network access, or pass data_dir=PATH to a folder holding niah/PaulGrahamEssays/*.txt.")
            files = sorted(found.path.glob("*.txt"))
            text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
            return [text], {"source": found.source, "origin": found.origin, "sha256": found.sha256}
        return pg19_texts(self.args, limit)

    def samples(self, env: TaskEnv) -> list[Sample]:
        a = self.args
        texts, info = self._texts(None)
        out: list[Sample] = []
        for t, text in enumerate(texts):
            limit = 1 if a["dataset"] == PG19 else None  # a book gives its first window only
            windows = _windows(env.tokenizer, text[: 16 * a["length"]], a["length"], a["prefix"], limit) if limit else []
            windows = windows or _windows(env.tokenizer, text, a["length"], a["prefix"], limit)  # a book: its start first
            for w, (prefix, continuation) in enumerate(windows):
                sid = f"{a['dataset']}-{len(out)}"
                meta = {"dataset": a["dataset"], "document": t if a["dataset"] == PG19 else w, "length": a["length"],
                        "prefix": a["prefix"], "bucket": a["bucket"], **info}
                turn = Turn(question=continuation, answers=[], max_new_tokens=0, scorer="perplexity")
                out.append(Sample(sid, prefix, [turn], meta=meta, chat=False))
        if not out:
            raise UserError(f"perplexity: no {a['dataset']} document has {a['length']} tokens in this tokenizer. Fix: a "
                            f"smaller length (--task-args length=...).")
        return out

    # --- scoring ------------------------------------------------------------------------------
    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        raise TypeError("perplexity is a log-likelihood task: the engine scores its tokens (score_tokens), not a "
                        "generated prediction")

    def score_tokens(self, sample: Sample, positions: Sequence[int], nll: Sequence[float]) -> dict[str, float]:
        """One document's scores: its perplexity (``score``), NLL sum and token count, and per
        position bucket ``nll_sum@lo-hi``, ``tokens@lo-hi``, ``ppl@lo-hi``."""
        width = self.args["bucket"]
        sums: dict[int, list[float]] = {}
        for pos, value in zip(positions, nll):
            s = sums.setdefault(pos // width, [0.0, 0])
            s[0] += value
            s[1] += 1
        total, count = float(sum(nll)), len(nll)
        out: dict[str, float] = {"score": math.exp(total / count) if count else float("nan"),
                                 "nll_sum": total, "tokens": count}
        for b in sorted(sums):
            label = bucket_label(b * width, (b + 1) * width)
            s, n = sums[b]
            out[f"nll_sum@{label}"], out[f"tokens@{label}"], out[f"ppl@{label}"] = s, n, math.exp(s / n)
        return out

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Perplexity pooled over documents, ``exp(Σ NLL / Σ tokens)``, overall (``score``) and per
        bucket (``ppl@lo-hi``), with the sums it comes from."""
        sums: dict[str, list[float]] = {}
        for r in records:
            for key in list(r.keys()):
                if key == "nll_sum" or key.startswith("nll_sum@"):
                    label = key[len("nll_sum"):]
                    tokens = r.get("tokens" + label)
                    if r.get(key) is None or not tokens:
                        continue
                    s = sums.setdefault(label, [0.0, 0])
                    s[0] += float(r[key])
                    s[1] += int(tokens)
        out: dict[str, float] = {}
        for label, (s, n) in sums.items():
            name = "score" if label == "" else "ppl" + label
            out[name] = math.exp(s / n)
            out["nll_sum" + label], out["tokens" + label] = s, n
        return dict(sorted(out.items(), key=lambda kv: (kv[0] != "score", _bucket_start(kv[0]), kv[0])))


def _bucket_start(key: str) -> int:
    try:
        return int(key.split("@", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return -1


# --- PG-19 from the hub ---------------------------------------------------------------------------
def pg19_texts(args: dict[str, Any], limit: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """PG-19 books (column ``text``) of ``args['split']``: from ``data_dir``'s parquet files, else from
    the hub repository's ``data/<split>-*.parquet`` shards at ``revision`` (cached; the commit
    recorded)."""
    if args["data_dir"]:
        folder = Path(args["data_dir"])
        files = sorted(folder.glob(f"**/{args['split']}-*.parquet")) or sorted(folder.glob("**/*.parquet"))
        if not files:
            raise UserError(f"perplexity: data_dir '{folder}' holds no parquet files. Fix: download {args['repo']}'s "
                            f"data/{args['split']}-*.parquet into it, or drop data_dir to fetch them from the hub.")
        info = {"source": "local", "origin": str(folder)}
    else:
        files, commit = _pg19_download(args["repo"], args["revision"], args["split"])
        info = {"source": "hub", "origin": f"{args['repo']}@{commit}", "revision": args["revision"], "commit": commit}
    import pyarrow.parquet as pq

    texts: list[str] = []
    for f in files:
        table = pq.read_table(f, columns=["text"])
        texts.extend(t for t in table.column("text").to_pylist() if t)
        if limit is not None and len(texts) >= limit:
            break
    return texts if limit is None else texts[:limit], info


def _pg19_download(repo: str, revision: str, split: str) -> tuple[list[Path], str]:
    """The split's parquet shards in the HF cache (``snapshot_download``, which reads the cached
    snapshot when the hub cannot be reached or ``HF_HUB_OFFLINE`` is set) and the commit they
    belong to."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    from .hub import hf_cache_dir

    where = f"{repo}@{revision}"
    fix = (f"run once with network access (the shards are cached), or download {repo}'s data/{split}-*.parquet and "
           f"pass their folder with --task-args data_dir=PATH")
    try:
        folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                        allow_patterns=[f"data/{split}-*.parquet", f"{split}/*.parquet"]))
    except hub_errors.RevisionNotFoundError:
        raise UserError(f"perplexity: revision '{revision}' does not exist in the hub dataset '{repo}'. Fix: pass an "
                        f"existing commit or branch with --task-args revision=..., or {fix}.") from None
    except hub_errors.GatedRepoError:
        raise UserError(f"perplexity: the hub dataset '{repo}' is gated. Fix: accept its terms and `hf auth login`, "
                        f"or {fix}.") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"perplexity: the hub dataset '{repo}' was not found (HF_ENDPOINT="
                        f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}). Fix: check repo= and "
                        f"HF_ENDPOINT, or {fix}.") from None
    except hub_errors.LocalEntryNotFoundError:
        raise UserError(f"perplexity: {where} is not in the HF cache ({hf_cache_dir()}) and the hub could not be "
                        f"reached. Fix: {fix}.") from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise UserError(f"perplexity: the hub answered HTTP {status} for {where}. Fix: retry later, or {fix}.") from None
    except OSError as exc:
        raise UserError(f"perplexity: could not write {where} into the HF cache ({hf_cache_dir()}): {exc}. Fix: free "
                        f"space or set HF_HOME to a writable folder, or {fix}.") from None
    files = sorted(folder.glob(f"data/{split}-*.parquet")) or sorted(folder.glob(f"{split}/*.parquet"))
    if not files:
        raise UserError(f"perplexity: {where} has no data/{split}-*.parquet shards. Fix: another split= or repo=, "
                        f"or {fix}.")
    return files, folder.name
