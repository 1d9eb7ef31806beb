"""Needle Threading (lcbench/tasks/needle_threading.py): haystacks generated from the seed at a length
in the target tokenizer, needles and threads that are correct by construction, upstream's scorer on
known strings, and the task through the `lcbench` command (tiny model)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lcbench.models.tiny import tiny_tokenizer
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.needle_threading import (SINGLE_QUESTION, NeedleThreading, exact_value, follow, needle_share,
                                            thread_share)

REPO = Path(__file__).resolve().parents[1]
UUID = re.compile(r'"([0-9a-f*]{8}-[0-9a-f*]{4}-[0-9a-f*]{4}-[0-9a-f*]{4}-[0-9a-f*]{12})"')


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _samples(tok, seed=0, **args):
    return NeedleThreading(**args).samples(TaskEnv(tok, "tiny", 100_000, seed))


def _pairs(sample):
    """The haystack's pairs in context order (json keeps the order of a JSON object's keys)."""
    return list(json.loads(sample.context).items())


def _n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_deterministic_from_the_seed_and_varies_across_seeds(tok):
    a, b = _samples(tok, 0, lengths="1500"), _samples(tok, 0, lengths="1500")
    assert [(s.id, s.context, s.turns[0].question, s.turns[0].answers) for s in a] == \
           [(s.id, s.context, s.turns[0].question, s.turns[0].answers) for s in b]
    c = _samples(tok, 1, lengths="1500")
    assert [s.id for s in a] == [s.id for s in c] and all(x.context != y.context for x, y in zip(a, c))


def test_uuids_are_drawn_as_upstreams_example_haystack(tok):
    """The README's Single_Needle example starts {"e3e70682-…": "f728b4fa-…"}: random.Random(0)'s first draws."""
    first = _samples(tok, 0, variants="single_needle", lengths="1000", depths="0")[0]
    assert _pairs(first)[0] == ("e3e70682-c209-4cac-629f-6fbed82c07cd", "f728b4fa-4248-5e3a-0a5d-2f346baa9455")
    assert first.context.startswith('{"e3e70682-c209-4cac-629f-6fbed82c07cd": "f728b4fa-')  # json.dumps layout


@pytest.mark.parametrize("length", [600, 2500, 9000])
def test_context_length_within_one_pair_of_the_request(tok, length):
    for s in _samples(tok, 3, lengths=str(length), needles="2", thread_lengths="3", threads="2"):
        n = _n_tokens(tok, s.context)
        pair = max(_n_tokens(tok, json.dumps(dict([p]))) for p in _pairs(s))
        assert abs(n - length) <= pair, (s.id, n, length, pair)
        assert s.meta["context_tokens"] == n and s.meta["num_kv_pairs"] == len(_pairs(s))


def test_single_needle_at_its_depth_with_upstreams_question(tok):
    for s in _samples(tok, 0, variants="single_needle", lengths="2000", depths="0;50;100"):
        pairs = _pairs(s)
        key = UUID.search(s.turns[0].question).group(1)
        assert s.turns[0].question == "\n" + SINGLE_QUESTION.format(key=key)
        idx = [k for k, _ in pairs].index(key)
        assert idx == round(s.meta["depth"] / 100 * (len(pairs) - 1))
        assert s.turns[0].answers == [dict(pairs)[key]]
    ends = _samples(tok, 0, variants="single_needle", lengths="2000", depths="0;100")
    assert [s.meta["needle_index"] for s in ends] == [0, ends[1].meta["num_kv_pairs"] - 1]


def test_threads_chain_to_their_answer_in_their_direction(tok):
    for s in _samples(tok, 5, variants="threading", lengths="3000", thread_lengths="2;4"):
        pairs = _pairs(s)
        lookup, order = dict(pairs), {k: i for i, (k, _) in enumerate(pairs)}
        start = s.meta["start_key"]
        chain = follow(lookup, start)
        # each value is the next key; thread_length pairs; the last value is the answer and no key
        assert len(chain) == s.meta["thread_length"] + 1 and chain[-1] == s.turns[0].answers[0]
        assert chain[-1] not in lookup and start not in lookup.values()
        where = [order[k] for k in chain[:-1]]
        if s.meta["direction"] == "forward":
            assert where == sorted(where)
        elif s.meta["direction"] == "backward":
            assert where == sorted(where, reverse=True)
        assert start in s.turns[0].question and exact_value(json.dumps(chain[-1]), s.turns[0].answers[0]) == 1.0


def test_multi_threads_are_separate_threads_each_to_its_answer(tok):
    for s in _samples(tok, 2, variants="multi_threading", lengths="4000", threads="3", thread_lengths="3"):
        lookup = dict(_pairs(s))
        starts, finals = s.meta["start_keys"], s.turns[0].answers
        chains = [follow(lookup, k) for k in starts]
        assert [c[-1] for c in chains] == finals and all(len(c) == 4 for c in chains)
        assert len({k for c in chains for k in c}) == 3 * 4  # no two threads share a hop
        reply = json.dumps(dict(zip(starts, finals)))
        assert thread_share(reply, starts, finals) == 1.0
        assert thread_share(json.dumps({starts[0]: finals[0], starts[1]: finals[0]}), starts, finals) == pytest.approx(1 / 3)


def test_multiple_and_conditional_needles(tok):
    for s in _samples(tok, 4, variants="multiple_needles;conditional_needles", lengths="3000", needles="3"):
        pairs, answers = _pairs(s), s.turns[0].answers
        lookup = dict(pairs)
        if s.meta["dataset"] == "multiple_needles":
            asked = json.loads(s.turns[0].question.split("Keys: ")[1].split("\n")[0])
            assert answers == [lookup[k] for k in asked]
            spots = sorted([k for k, _ in pairs].index(k) for k in asked)
        else:
            marked = [(i, v) for i, (k, v) in enumerate(pairs) if "*" in k]
            assert [v for _, v in marked] == answers and len(marked) == 3
            spots = [i for i, _ in marked]
        if s.meta["placement"] == "clustered":
            assert spots == list(range(spots[0], spots[0] + 3))
        assert needle_share(repr(answers), answers) == 1.0


def test_exact_scorer_on_upstream_edge_cases():
    u = "1759edc3-72ae-2244-8b01-63c1cd9d2b7d"
    assert exact_value(f'"{u}"', u) == 1.0  # upstream: literal_eval of a quoted string
    assert exact_value(f"  '{u}'\n", u) == 1.0  # stripped first
    assert exact_value(f"\t\n '{u}'", u) == 1.0  # (upstream's literal_eval of the unstripped text raises here)
    assert exact_value(f'"{u}", the value of the key', u) == 1.0  # unparseable: text less its quote, cut to length
    assert exact_value(f'"{u}", "{u}"', u) == 0.0  # parses as a tuple, which is not the string
    assert exact_value(f"{u} is the value", u) == 1.0  # unparseable: its text, cut to the answer's length
    assert exact_value(u, u) == 1.0  # an unquoted UUID (upstream's literal_eval raises): the stripped text
    assert exact_value(f'["{u}"]', u) == 0.0  # a list is not the string (upstream compares a list slice)
    assert exact_value(f"The value is {u}", u) == 0.0  # text before the answer: the prefix differs
    assert exact_value(u[:-1], u) == 0.0 and exact_value(u.upper(), u) == 0.0 and exact_value("", u) == 0.0


def test_per_needle_scorer():
    a, b, c = ("e3e70682-c209-4cac-629f-6fbed82c07cd", "f728b4fa-4248-5e3a-0a5d-2f346baa9455",
               "1759edc3-72ae-2244-8b01-63c1cd9d2b7d")
    assert needle_share(f"['{a}', '{b}']", [a, b]) == 1.0
    assert needle_share(f"['{b}', '{a}']", [a, b]) == 1.0  # membership, not order
    assert needle_share(f"['{a}', '{c}']", [a, b]) == 0.5
    assert needle_share(f"The values are {a} and {c}.", [a, b]) == 0.5  # unparseable: the UUIDs it names
    assert needle_share("[]", [a, b]) == 0.0
    task = NeedleThreading()
    s = _samples(tiny_tokenizer(), 0, variants="multiple_needles", lengths="2000", needles="2")[0]
    assert task.score(s, s.turns[0], repr(s.turns[0].answers)) == {"score": 1.0, "exact": 1.0}
    assert task.score(s, s.turns[0], repr(s.turns[0].answers[:1])) == {"score": 0.5, "exact": 0.0}


def test_bad_arguments_are_user_errors(tok):
    from lcbench.errors import UserError

    with pytest.raises(UserError, match="holds fewer than"):
        _samples(tok, 0, variants="single_needle", lengths="100")
    with pytest.raises(UserError, match="needs 40 pairs"):
        _samples(tok, 0, variants="multiple_needles", lengths="1000", needles="40")
    with pytest.raises(UserError, match="char="):
        _samples(tok, 0, char="a")
    with pytest.raises(UserError, match="directions"):
        _samples(tok, 0, directions="sideways")


def _lcbench(*args, out: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    # the repository first on the path, so the spawn runs this checkout's lcbench
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    return subprocess.run([*cmd, "run", "--task", "needle_threading", "--model", "tiny-random-llama", "--device", "cpu",
                           "--output-path", str(out), *args], capture_output=True, text=True, timeout=300, env=env)


def test_full_on_the_tiny_model_through_the_cli(tmp_path):
    p = _lcbench("--limit", "1", out=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    (samples,) = tmp_path.glob("needle_threading__full__*/samples.jsonl")
    (rec,) = [json.loads(line) for line in samples.read_text().splitlines()]
    assert rec["meta"]["dataset"] == "single_needle" and rec["scores"]["score"] in (0.0, 1.0)
    assert rec["measured"]["context_tokens"] <= 2000 + 80  # a 2000-token haystack (tiny tokenizer), the chat template


def test_bad_task_arguments_exit_2_without_a_traceback(tmp_path):
    p = _lcbench("--task-args", "variants=single_needle,lengths=100", out=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "holds fewer than" in (p.stderr + p.stdout)
    assert not list(tmp_path.glob("needle_threading__*"))  # no run folder for a refused spec
