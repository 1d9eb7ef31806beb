"""A method is one class: its stages follow its hooks, and a declaration mistake is refused when
the registry loads it, with an error that names the file (issue: one declaration per method)."""

import gc

import pytest

from lcbench.errors import UserError
from lcbench.params import Param
from lcbench.methods.base import Stage, declaration_errors, overridden_stages
from lcbench.methods.registry import METHODS, builtin_methods, check_declaration


def test_stages_follow_the_hooks():
    class Drops(Stage):
        name, family = "drops_test", "kv_dropping"

        def compress_layer(self, layer, seen):
            return layer

    class DropsAndEvicts(Drops):
        def after_decode_step(self, layer, layer_idx, query):
            return layer

    assert Drops.stages == ("cache",)
    assert DropsAndEvicts.stages == ("cache", "decode")
    assert declaration_errors(Drops) == [] and declaration_errors(DropsAndEvicts) == []


def test_every_builtin_is_found_and_declared_right():
    found = builtin_methods()
    assert {"full", "snapkv", "kivi", "llmlingua", "ashape", "quest", "pool", "kvmerge"} <= set(found)
    for name, cls in found.items():
        assert declaration_errors(cls) == [], name
        assert set(cls.stages) == set(overridden_stages(cls)), name
    # everything registered is a found built-in, a kvpress press, or a class another test added (*_test)
    assert sorted(found) == [n for n in METHODS.names() if not n.startswith("kvpress:") and not n.endswith("_test")]


@pytest.mark.parametrize("body, message", [
    ({"family": ""}, "sets no `family`"),
    ({"family": "kv_droping"}, "family 'kv_droping' is not one of"),
    ({"stages": ("cache", "decode")}, "declares the stage 'decode' but overrides none of its hooks"),
    ({"stages": ("text",)}, "overrides compress_layer but its `stages` leaves out 'cache'"),
    ({"stages": ("cache", "kache")}, "unknown stage 'kache'"),
    ({"name": "bad+name"}, "contains one of"),
    ({"params": (Param("window", int, None, "w"),)}, "parameter 'window' has no default"),
    ({"params": (Param("window", int, 8, "w"),), "defaults": {"windw": 4}}, "`defaults` set 'windw'"),
    ({"attention_terms": frozenset({"softcap"})}, "declares `attention_terms` but computes no attention"),
    ({"attention_terms": frozenset({"softcapp"}), "prefill_attention": lambda self, *a, softcapp=None: None,
      "stages": ("prefill_attention", "cache")}, "name 'softcapp', which is not one of softcap, sinks"),
    ({"attention_terms": frozenset({"sinks"}), "prefill_attention": lambda self, m, q, k, v, mask, s, i, window=None: None,
      "stages": ("prefill_attention", "cache")}, "its prefill_attention takes no such keyword (the engine passes `sinks=`)"),
])
def test_declaration_mistakes_are_refused_naming_the_file(body, message):
    attrs = {"name": "mistake_test", "family": "kv_dropping", "compress_layer": lambda self, layer, seen: layer,
             "__module__": __name__, **body}
    cls = type("Mistake", (Stage,), attrs)
    METHODS.add("mistake_test", cls)
    try:
        with pytest.raises(UserError) as err:
            METHODS.get("mistake_test")
    finally:
        METHODS.remove("mistake_test")  # a wrongly declared entry left behind breaks every later METHODS.get
    assert message in str(err.value)
    assert "test_declarations.py" in str(err.value)  # the file the class lives in


def test_defaults_are_declared_once_on_the_class():
    """A class's ``defaults`` override its params' defaults (one value, written once); SnapKV's
    window and pooling are declared once and reused by the methods that score like it."""
    class Wider(Stage):
        name, family = "wider_test", "kv_dropping"
        params = (Param("window", int, 8, "w"), Param("seed", int, 0, "s"))
        defaults = {"window": 32}

        def compress_layer(self, layer, seen):
            return layer

    assert [(p.name, p.default) for p in Wider.params] == [("window", 32), ("seed", 0)]
    assert Wider(0.5).args == {"window": 32, "seed": 0}
    for name in ("snapkv", "pyramidkv", "adakv", "chunkkv", "kvmerge"):
        window = {p.name: p.default for p in METHODS.get(name).params}["window_size"]
        assert window == 64, name


def test_registered_name_must_be_the_class_name():
    class Named(Stage):
        name, family = "named_test", "kv_dropping"

        def compress_layer(self, layer, seen):
            return layer

    with pytest.raises(UserError, match="registered as 'other_name' but its class says name = 'named_test'"):
        check_declaration("other_name", Named)


def test_a_name_taken_twice_is_refused():
    clash = type("SnapKVAgain", (Stage,), {"name": "snapkv", "family": "kv_dropping",
                                            "__module__": "lcbench.methods.dropping.clash",
                                            "compress_layer": lambda self, layer, seen: layer})
    try:
        with pytest.raises(UserError, match="method name 'snapkv' is declared twice"):
            builtin_methods()
    finally:
        del clash
        gc.collect()
    assert "snapkv" in builtin_methods()


# --- tasks -------------------------------------------------------------------------------------
def test_every_builtin_task_is_found():
    from lcbench.tasks.base import declaration_errors as task_errors
    from lcbench.tasks.registry import TASKS, builtin_tasks

    found = builtin_tasks()
    assert {"longbench", "longbench_e", "minilongbench", "niah", "ruler", "scbench", "scbench_kv",
            "scbench_kv_synth"} <= set(found)
    assert len([n for n in found if n.startswith("scbench_")]) == 16  # 12 released + 4 synthetic
    for name, cls in found.items():
        assert task_errors(cls) == [], name
    assert sorted(found) == TASKS.names()


def test_task_mistakes_are_refused_naming_the_file():
    from lcbench.tasks.base import Task
    from lcbench.tasks.registry import TASKS

    class NoScore(Task):
        name, suite, version = "noscore_test", "test", "1"
        mode = "multi_requests"

        def samples(self, env):
            return []

    TASKS.add("noscore_test", NoScore)
    with pytest.raises(UserError) as err:
        TASKS.get("noscore_test")
    text = str(err.value)
    assert "does not implement score" in text and "mode 'multi_requests' is not one of" in text
    assert "test_declarations.py" in text


def test_a_code_task_template_hash_covers_its_arguments():
    from lcbench.params import Param
    from lcbench.tasks.base import Task

    class Templated(Task):
        name, suite, version = "templated_test", "test", "1"
        params = (Param("prompt", str, "Q: {q}", "template"),)

        def samples(self, env):
            return []

        def score(self, sample, turn, prediction):
            return {"score": 0.0}

    assert Templated().template_hash() != Templated(prompt="Question: {q}").template_hash()
