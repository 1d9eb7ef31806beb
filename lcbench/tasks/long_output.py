"""Long output: chain-of-thought arithmetic whose solution needs many generated tokens (issue #17).

Decode-side methods differ most when the cache grows during decoding; this task makes it grow.
Each sample is a multi-step arithmetic word problem (a running quantity changed ``steps`` times by
adding, taking away, multiplying and halving), generated offline from the seed, asked to be
solved step by step and to end with ``Answer: N``. The context is ``shots`` worked examples of the
same kind (each solved in full, one line per step), so there is a long context for prefill-time
methods to compress and a long output for decode-time eviction to act on. ``max_new_tokens``
(default 768) leaves room for the reasoning.

Scorer (exact answer): ``score`` is 1 when the number after the first ``Answer:`` in the
prediction (commas and a trailing period ignored) equals the gold answer, else 0; without any
``Answer:`` the last number in the prediction is taken (``strict`` counts only an ``Answer:``
line; ``answer_found`` says whether one was written). For synthetic problems ``steps_on_track`` is
the share of the solution's intermediate values (start value, then each step's result) that the
prediction's ``Step`` lines reproduce in order before the first wrong one — where a small model
gets no final answer right, it still shows how long each method keeps the reasoning on track.

``source=gsm8k`` reads GSM8K (Cobbe et al., arXiv:2110.14168; hub dataset ``openai/gsm8k``,
config ``main``: ``main/test-00000-of-00001.parquet`` for the problems and the train file's first
``shots`` rows as worked examples, their ``#### N`` line rewritten as ``Answer: N``) through
``huggingface_hub`` at ``revision`` (default ``main``: no commit of it is pinned here), or from
``data_dir`` (``test.jsonl`` / ``train.jsonl`` or ``.parquet`` with ``question`` and ``answer``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..params import Param
from .base import Task, TaskEnv
from .hub import HubFile, download
from .sample import Sample, Turn

NAMES = ("Mia", "Omar", "Lena", "Ravi", "Sofia", "Kenji", "Amara", "Tom", "Ines", "Yusuf")
ITEMS = ("marbles", "stamps", "coins", "shells", "cards", "beads", "stickers", "pebbles")
INSTRUCTION = ("Solve the problem. Reason step by step, writing one line per step with its intermediate "
               "result, and end with a line 'Answer: N' where N is the final number.")
GSM8K = "openai/gsm8k"


@dataclass(frozen=True)
class Problem:
    """One problem: its text, its worked solution (one line per step) and its answer."""

    text: str
    solution: str
    answer: int
    values: tuple[int, ...] = ()  # the start value, then each step's result (synthetic problems)


def make_problem(rng: random.Random, steps: int) -> Problem:
    """A running quantity changed ``steps`` times; every intermediate value stays a whole number
    between 1 and 9999, so each step is one small exact computation."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(5, 60)
    sentences = [f"{name} has {value} {item}."]
    values = [value]
    lines = [f"Step 1: {name} starts with {value} {item}."]
    for k in range(2, steps + 2):
        ops = ["add", "sub"] + (["mul"] if value * 2 <= 9999 else []) + (["half"] if value % 2 == 0 else [])
        op = rng.choice(ops)
        if op == "add":
            x = rng.randint(2, 99)
            sentences.append(f"Then {name} gets {x} more {item}.")
            new, expr = value + x, f"{value} + {x}"
        elif op == "sub" and value > 1:
            x = rng.randint(1, min(99, value - 1))
            sentences.append(f"Then {name} gives away {x} {item}.")
            new, expr = value - x, f"{value} - {x}"
        elif op == "mul":
            x = rng.choice([f for f in (2, 3, 4) if value * f <= 9999])
            word = {2: "doubles", 3: "triples", 4: "quadruples"}[x]
            sentences.append(f"Then the number of {item} {name} has {word}.")
            new, expr = value * x, f"{value} * {x}"
        else:  # half (or a sub that cannot take anything away)
            if value % 2:
                x = rng.randint(2, 99)
                sentences.append(f"Then {name} gets {x} more {item}.")
                new, expr = value + x, f"{value} + {x}"
            else:
                sentences.append(f"Then {name} gives half of the {item} to a friend.")
                new, expr = value // 2, f"{value} / 2"
        lines.append(f"Step {k}: {expr} = {new}.")
        value = new
        values.append(value)
    sentences.append(f"How many {item} does {name} have at the end?")
    lines.append(f"Answer: {value}")
    return Problem(" ".join(sentences), "\n".join(lines), value, tuple(values))


def problems(seed: int, count: int, steps: int) -> list[Problem]:
    """``count`` problems of ``steps`` steps, the same for the same seed."""
    rng = random.Random(f"long_output:{seed}:{steps}")
    return [make_problem(rng, steps) for _ in range(count)]


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def extract_answer(prediction: str) -> tuple[float | None, bool]:
    """The predicted number and whether it came from an ``Answer:`` line (else the last number)."""
    found = re.search(r"Answer\s*:\s*\**\s*\$?\s*(" + _NUMBER + ")", prediction, flags=re.IGNORECASE)
    if found:
        return _number(found.group(1)), True
    numbers = re.findall(_NUMBER, prediction)
    return (_number(numbers[-1]) if numbers else None), False


def steps_on_track(prediction: str, values: tuple[int, ...] | list[int]) -> float:
    """Share of ``values`` the prediction's ``Step`` lines give in order before the first wrong one
    (a line's value: the number after its last '=', else its first number)."""
    got = []
    for line in prediction.splitlines():
        if not line.strip().lower().startswith("step"):
            continue
        body = line.split(":", 1)[1] if ":" in line else line
        numbers = re.findall(_NUMBER, body.rsplit("=", 1)[1] if "=" in body else body)
        got.append(_number(numbers[0]) if numbers else None)
    right = 0
    for want, have in zip(values, got):
        if have is None or abs(have - want) > 1e-9:
            break
        right += 1
    return right / len(values) if values else 0.0


def gsm8k_answer(answer: str) -> tuple[str, int | float]:
    """A GSM8K answer field as a worked solution ending 'Answer: N', and N."""
    body, _, final = answer.rpartition("####")
    value = _number(final.strip())
    if value is None:
        raise UserError(f"long_output: a GSM8K answer has no '#### N' line: {answer[-80:]!r}. Fix: use the "
                        f"dataset's 'main' config (question, answer with '#### N').")
    value = int(value) if value == int(value) else value
    body = re.sub(r"<<[^>]*>>", "", body).strip()  # the calculator annotations
    return f"{body}\nAnswer: {value}", value


class LongOutput(Task):
    name = "long_output"
    suite = "long_output"
    version = "1"
    source = "lcbench (synthetic, seeded); GSM8K (openai/gsm8k, main) with source=gsm8k"
    summary = "chain-of-thought arithmetic needing long outputs (exact answer); the cache grows during decoding"
    params = (
        Param("source", str, "synthetic", "'synthetic' (generated from the seed, offline) or 'gsm8k' (hub or data_dir)",
              choices=("synthetic", "gsm8k")),
        Param("samples", int, 20, "problems (synthetic)", min=1),
        Param("steps", int, 24, "steps per synthetic problem (its solution has one line per step)", min=1),
        Param("shots", int, 6, "worked examples in the context", min=0),
        Param("max_new_tokens", int, 768, "tokens to generate", min=1),
        Param("min_new_tokens", int, 0, "EOS masked before this many tokens (to force long decodes)", min=0),
        Param("revision", str, "main", "GSM8K hub revision (source=gsm8k)"),
        Param("data_dir", str, "", "a local GSM8K copy: test.jsonl/train.jsonl or .parquet (source=gsm8k)"),
    )

    def samples(self, env: TaskEnv) -> list[Sample]:
        a = self.args
        if a["source"] == "gsm8k":
            test, train = self._gsm8k()
            shots = [Problem(r["question"], *gsm8k_answer(r["answer"])) for r in train[: a["shots"]]]
            asked = [Problem(r["question"], *gsm8k_answer(r["answer"])) for r in test]
        else:
            shots = problems(env.seed + 1_000_003, a["shots"], a["steps"])
            asked = problems(env.seed, a["samples"], a["steps"])
        context = "Here are solved examples.\n\n" + "".join(
            f"Problem: {p.text}\nSolution:\n{p.solution}\n\n" for p in shots)
        out = []
        for i, p in enumerate(asked):
            turn = Turn(question=f"{INSTRUCTION}\n\nProblem: {p.text}\nSolution:", answers=[str(p.answer)],
                        max_new_tokens=a["max_new_tokens"], scorer="exact_number", stop=("\nProblem:",),
                        min_new_tokens=a["min_new_tokens"], meta={"values": list(p.values)} if p.values else {})
            out.append(Sample(id=f"long_output-{a['source']}-{i}", context=context, turns=[turn],
                              meta={"dataset": f"long_output_{a['source']}", "steps": a["steps"] if
                                    a["source"] == "synthetic" else None, "shots": len(shots)}))
        return out

    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        value, strict = extract_answer(prediction)
        gold = float(turn.answers[0])
        hit = value is not None and abs(value - gold) < 1e-9
        out = {"score": float(hit), "strict": float(hit and strict), "answer_found": float(strict)}
        if turn.meta.get("values"):
            out["steps_on_track"] = steps_on_track(prediction, turn.meta["values"])
        return out

    # --- GSM8K -------------------------------------------------------------------------------
    def _gsm8k(self) -> tuple[list[dict], list[dict]]:
        local = self.args["data_dir"]
        fix = "pass a local copy with --task-args source=gsm8k,data_dir=DIR (test.jsonl and train.jsonl)"
        if local:
            return _read_split(Path(local), "test"), _read_split(Path(local), "train")
        rev = self.args["revision"]
        paths = [download(HubFile(GSM8K, f"main/{split}-00000-of-00001.parquet", rev), "long_output (gsm8k)", fix)
                 for split in ("test", "train")]
        return _read_rows(paths[0]), _read_rows(paths[1])


def _read_split(folder: Path, split: str) -> list[dict]:
    for name in (f"{split}.jsonl", f"{split}.parquet", f"main/{split}-00000-of-00001.parquet"):
        if (folder / name).is_file():
            return _read_rows(folder / name)
    raise UserError(f"long_output: {folder} has no {split}.jsonl or {split}.parquet. Fix: put GSM8K's {split} split "
                    f"there (rows with 'question' and 'answer'), or drop data_dir to read it from the hub.")


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows) if not {"question", "answer"} <= set(r)]
    if bad:
        raise UserError(f"long_output: row {bad[0]} of {path} lacks 'question' or 'answer'. Fix: use GSM8K's "
                        f"'main' config files.")
    return rows
