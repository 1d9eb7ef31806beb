"""LongBench loaders: local folders of ``<config>.jsonl`` in the released format (fixtures written
for these tests), and the hub path's error handling (no network here: ``hub_load`` is replaced)."""

from __future__ import annotations

import shutil
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
    with pytest.raises(UserError, match=r"no narrativeqa\.jsonl.*hotpotqa.*data_dir="):
        data.load_rows("narrativeqa", FIXTURES)
    with pytest.raises(UserError, match="not a folder"):
        data.load_rows("trec", tmp_path / "nowhere")


def test_bad_json_line(tmp_path):
    (tmp_path / "trec.jsonl").write_text('{"input": "x"}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        data.load_rows("trec", tmp_path)


def test_offline_hub_gives_a_user_error_that_says_data_dir(monkeypatch):
    calls = []

    def offline(repo, config, split):
        calls.append(repo)
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data, "hub_load", offline)
    with pytest.raises(UserError) as err:
        data.load_rows("trec", None)
    message = str(err.value)
    assert "zai-org/LongBench" in message and "data_dir=" in message and "data.zip" in message
    assert calls == ["zai-org/LongBench"]  # a network failure is not retried under the old name


def test_hub_falls_back_to_the_old_repository_name(monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    def hub(repo, config, split):
        if repo == "zai-org/LongBench":
            raise DatasetNotFoundError(f"Dataset '{repo}' doesn't exist on the Hub")
        assert (config, split) == ("hotpotqa_e", "test")
        return [{"input": "q", "context": "c", "answers": ["a"], "length": 5, "all_classes": None}]

    monkeypatch.setattr(data, "hub_load", hub)
    assert data.load_rows("hotpotqa_e", None)[0]["answers"] == ["a"]
