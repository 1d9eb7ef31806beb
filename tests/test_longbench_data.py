"""LongBench loaders: local folders of ``<config>.jsonl`` and ``data.zip`` in the released format
(fixtures written for these tests). The hub path runs the real huggingface_hub client against a
loopback stand-in in test_hub.py."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from lcbench.errors import UserError
from lcbench.tasks.longbench import data

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"


def test_local_folder_and_data_subfolder(tmp_path):
    rows = data.load_rows("trec", FIXTURES)
    assert [r["_id"] for r in rows] == ["fx-trec-0", "fx-trec-1"]
    assert set(rows[0]) == {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    # data.zip unpacks to data/<config>.jsonl: the parent folder works too
    (tmp_path / "data").mkdir()
    shutil.copy(FIXTURES / "trec_e.jsonl", tmp_path / "data" / "trec_e.jsonl")
    assert [r["length"] for r in data.load_rows("trec_e", tmp_path)] == [1200, 5000, 9000]


def test_missing_config_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"no narrativeqa\.jsonl.*hotpotqa.*--data-dir"):
        data.load_rows("narrativeqa", FIXTURES)
    with pytest.raises(UserError, match="neither a folder nor data.zip"):
        data.load_rows("trec", tmp_path / "nowhere")


def test_bad_json_line_and_wrong_schema(tmp_path):
    (tmp_path / "trec.jsonl").write_text('{"input": "x", "context": "c", "answers": []}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        data.load_rows("trec", tmp_path)
    (tmp_path / "trec.jsonl").write_text('{"question": "x", "context": "c"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1 is not a LongBench row \(missing input, answers; it has context, question\)"):
        data.load_rows("trec", tmp_path)


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


def test_data_zip_read_in_place(tmp_path):
    """``data.zip`` as released (``data/<config>.jsonl``), given as the file or as the folder holding it."""
    zipped = _zip(tmp_path / "data.zip", {f"data/{p.name}": p.read_text(encoding="utf-8") for p in FIXTURES.glob("*.jsonl")})
    assert [r["_id"] for r in data.load_rows("trec", zipped)] == ["fx-trec-0", "fx-trec-1"]
    assert [r["length"] for r in data.load_rows("trec_e", tmp_path)] == [1200, 5000, 9000]
    with pytest.raises(UserError, match=r"has no data/narrativeqa\.jsonl .*not LongBench's released data.zip layout"):
        data.load_rows("narrativeqa", zipped)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a readable zip archive.*partial download"):
        data.load_rows("trec", tmp_path / "broken.zip")


def test_hub_file_is_pinned():
    """The hub's data.zip at a full commit (so a cached copy is used with no network call at all)."""
    f = data.hub_file()
    assert (f.repo, f.filename) == ("zai-org/LongBench", "data.zip")
    assert len(f.revision) == 40 and all(c in "0123456789abcdef" for c in f.revision)
    assert data.hub_file("main").revision == "main"
