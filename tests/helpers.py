"""Small builders shared by tests."""

from lcbench.tasks.sample import Sample, Turn

FILLER = "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of essays. "


def make_sample(n_turns: int = 1, repeat: int = 12, max_new_tokens: int = 10, sid: str = "s0") -> Sample:
    turns = [Turn(question=f"\n\nQuestion: What is the special magic number {i}? Answer:", answers=[f"{7421 + i}"],
                  max_new_tokens=max_new_tokens, scorer="passkey") for i in range(n_turns)]
    return Sample(sid, "Read the following text carefully. " + FILLER * repeat, turns)


def decoded_ids(run) -> tuple[dict, dict]:
    """Call ``run()`` (which returns engine records) and return the token ids the engine decoded
    (each TurnRecord keeps them) and the records, both keyed by (sample id, turn)."""
    records = run()
    keys = [(r.sample_id, r.turn) for r in records]
    return {k: r.decoded_ids for k, r in zip(keys, records)}, dict(zip(keys, records))


def saved_family(folder, name: str):
    """The tiny model of family ``name`` saved with the offline tokenizer into ``folder`` (a local
    checkpoint, as a user passes ``--model <folder>``); returns the folder."""
    from lcbench.models.families import build, family
    from lcbench.models.tiny import tiny_tokenizer

    build(family(name), "eager").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def records_by_method(out) -> dict[str, list[dict]]:
    """Every run folder's records under ``out``, by the method named in the folder."""
    import json
    from pathlib import Path

    return {p.parent.name.split("__")[1]: [json.loads(line) for line in p.read_text().splitlines()]
            for p in Path(out).rglob("samples.jsonl")}


def sharing_prefills(engines: list) -> list:
    """``engines`` given one unbounded prefill memo for the union of their chains' needs (what
    ``lcbench run`` does for runs that share a prefill); returns them."""
    from lcbench.engine.shared_prefill import PrefillMemo

    needs = engines[0].chain.needs
    for e in engines[1:]:
        needs = needs.merge(e.chain.needs)
    memo = PrefillMemo(needs, None)
    for e in engines:
        e.prefill_memo = memo
    return engines
