"""Small builders shared by tests."""

from lcbench.tasks.sample import Sample, Turn

FILLER = "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of essays. "


def make_sample(n_turns: int = 1, repeat: int = 12, max_new_tokens: int = 10, sid: str = "s0") -> Sample:
    turns = [Turn(question=f"\n\nQuestion: What is the special magic number {i}? Answer:", answers=[f"{7421 + i}"],
                  max_new_tokens=max_new_tokens, scorer="passkey") for i in range(n_turns)]
    return Sample(sid, "Read the following text carefully. " + FILLER * repeat, turns)


def decoded_ids(run) -> tuple[dict, dict]:
    """Call ``run()`` (which returns engine records) and return the token ids the engine decoded
    and the records, both keyed by (sample id, turn): a spy on the decoder, rows in record order."""
    import pytest

    from lcbench.engine import runner

    ids: list[list[int]] = []
    real = runner.greedy_decode

    def spy(*args, **kwargs):
        rows = real(*args, **kwargs)
        ids.extend(row.tokens for row in rows)
        return rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", spy)
        records = run()
    assert len(ids) == len(records)
    keys = [(r["sample_id"], r["turn"]) for r in records]
    return dict(zip(keys, ids)), dict(zip(keys, records))
