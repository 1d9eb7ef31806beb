"""A tiny random Llama and a BPE tokenizer trained offline with ``tokenizers``: for tests of
mechanics (token identity, positions, resume) and for smoke runs of the CLI. Its answers are
meaningless; never report its scores."""

from __future__ import annotations

import functools

import torch

from .loading import LoadedModel, resolve_dtype

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of essays. "
    "What is the best thing to do in San Francisco? Eat a sandwich and sit in Dolores Park. "
    "The special magic number is 7421. Question: Answer: Read the following text carefully. "
    "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) - the of and to in is that it was for on are with as "
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ≤ 512) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed: int = 0, layers: int = 2, dtype=torch.float32, **overrides):
    """A random LlamaForCausalLM with GQA (4 query heads, 2 KV heads) and a peaked output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               initializer_range=0.2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=None, tie_word_embeddings=False, attn_implementation="sdpa")
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def load_tiny_random_llama(args: dict, device: str) -> LoadedModel:
    dtype = resolve_dtype(args.get("dtype"), device)
    model = tiny_llama(dtype=dtype).to(device)
    return LoadedModel(model, tiny_tokenizer(), "tiny-random-llama", "built from a config (random weights)",
                       {"dtype": str(dtype).replace("torch.", "")})


load_tiny_random_llama.model_args = ("dtype",)  # see loading.refuse_unused_args
