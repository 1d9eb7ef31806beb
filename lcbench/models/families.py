"""The decoder families lcbench is checked on: tiny random models built from transformers configs.

Each :class:`Family` names a transformers config/model class and the overrides that make a tiny
model of it (2 layers, hidden 64, the offline tokenizer of :mod:`lcbench.models.tiny`) — with the
variant's attention features switched on and a sliding window (``WINDOW`` tokens) far smaller than
the contexts the support matrix runs (:mod:`lcbench.architectures`), so the window matters. The
matrix, its tests (``tests/test_architectures.py``) and the README table all read this list: add a
family here when transformers adds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

WINDOW = 24  # sliding window of the windowed variants (the matrix's contexts are ~250 tokens)
SOFTCAP = 3.0  # attention-logit softcap small enough to change the tiny model's attention


@dataclass(frozen=True)
class Family:
    """A tiny model of one decoder family. ``config``/``model`` are transformers class names;
    ``overrides`` replace the common tiny settings (:func:`tiny_config_kwargs`); ``features`` says
    what attention features the variant exercises (for the table)."""

    name: str
    config: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    features: str = ""
    strong_sinks: bool = False  # learned attention sinks set large enough to change greedy output

    def available(self) -> bool:
        import transformers

        return hasattr(transformers, self.config) and hasattr(transformers, self.model)


def _alternating(n: int = 2) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


_SLIDING = {"sliding_window": WINDOW}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_DELTA = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8}
_MAMBA2 = {"mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 8, "mamba_n_groups": 1}
_MLA = {"kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "num_key_value_heads": 4}
_MLA_Q = {**_MLA, "q_lora_rank": 16}  # low-rank queries too
_MLA_MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1}
_GPT_SHAPE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "num_key_value_heads": None, "head_dim": None}
_ALT = {"sliding_window": WINDOW, "layer_types": _alternating()}
# KV sharing (Gemma-3n/4): the last 2 of 4 layers reuse the KV of the last earlier layer of their kind
_KV_SHARED = {"sliding_window": WINDOW, "num_hidden_layers": 4, "layer_types": _alternating(4), "num_kv_shared_layers": 2}
_PER_LAYER_INPUT = {"vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 8}  # Gemma-4's, covering the vocabulary
_GEMMA3N = {"vocab_size_per_layer_input": 64, "hidden_size_per_layer_input": 8, "altup_num_inputs": 2, "laurel_rank": 8}
_FALCON = {"num_kv_heads": 2, "new_decoder_architecture": False, "head_dim": None, "num_key_value_heads": None}

FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", features="GQA"),
    Family("mistral", "MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "no window"),
    Family("mistral-window", "MistralConfig", "MistralForCausalLM", _SLIDING, "sliding window (all layers)"),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM",
           {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}, "MoE"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", features="GQA, qkv bias"),
    Family("qwen2-window", "Qwen2Config", "Qwen2ForCausalLM",
           {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
           "use_sliding_window (layer 1 windowed)"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", features="q/k norm"),
    Family("qwen3-moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
           {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}, "MoE"),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", features=""),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
           {**_ALT, "attn_logit_softcapping": SOFTCAP, "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16}, "alternating window, attention softcap"),
    Family("gemma3-text", "Gemma3TextConfig", "Gemma3ForCausalLM",
           {**_ALT, "query_pre_attn_scalar": 16}, "alternating window, q/k norm"),
    Family("phi", "PhiConfig", "PhiForCausalLM", {"num_key_value_heads": 4}, "partial rotary"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", _SLIDING, "sliding window (all layers)"),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", features=""),
    Family("olmo3", "Olmo3Config", "Olmo3ForCausalLM", _ALT, "alternating window"),
    Family("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": 4}, "parallel residual"),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel",
           {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "num_key_value_heads": None},
           "learned positions"),
    Family("gpt-bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
           {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "multi_query": True,
            "num_key_value_heads": None}, "multi-query"),
    Family("opt", "OPTConfig", "OPTForCausalLM",
           {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None, "head_dim": None},
           "learned positions"),
    Family("cohere", "CohereConfig", "CohereForCausalLM", features="parallel block"),
    Family("cohere2", "Cohere2Config", "Cohere2ForCausalLM", _ALT, "alternating window (NoPE global layer)"),
    Family("granite", "GraniteConfig", "GraniteForCausalLM", {"attention_multiplier": 0.1}, "custom scaling"),
    Family("glm4", "Glm4Config", "Glm4ForCausalLM", features="partial rotary"),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", features="NoPE layers"),
    Family("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", _SLIDING, "sliding window (all layers)"),
    Family("exaone4", "Exaone4Config", "Exaone4ForCausalLM", _ALT, "alternating window"),
    Family("gpt-oss", "GptOssConfig", "GptOssForCausalLM",
           {**_ALT, "num_local_experts": 4, "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "alternating window, learned sinks",
           strong_sinks=True),
    Family("gemma4-text", "Gemma4TextConfig", "Gemma4ForCausalLM", {**_ALT, **_PER_LAYER_INPUT}, "alternating window"),
    Family("gemma4-text-kv-shared", "Gemma4TextConfig", "Gemma4ForCausalLM", {**_KV_SHARED, **_PER_LAYER_INPUT},
           "alternating window"),
    Family("gemma3n-text", "Gemma3nTextConfig", "Gemma3nForCausalLM",
           {**_ALT, "num_kv_shared_layers": 0, **_GEMMA3N, "activation_sparsity_pattern": [0.0, 0.0]},
           "alternating window, AltUp; KV sharing off"),
    Family("gemma3n-text-kv-shared", "Gemma3nTextConfig", "Gemma3nForCausalLM",
           {**_KV_SHARED, **_GEMMA3N, "activation_sparsity_pattern": [0.0] * 4},
           "alternating window, AltUp (as Gemma-3n's checkpoints)"),
    Family("olmoe", "OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}, "MoE"),
    Family("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM",
           {"num_local_experts": 4, "num_experts_per_tok": 2}, "MoE, custom scaling"),
    Family("glm4-moe", "Glm4MoeConfig", "Glm4MoeForCausalLM",
           {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
            "n_group": 1, "topk_group": 1}, "MoE, partial rotary"),
    Family("seed-oss", "SeedOssConfig", "SeedOssForCausalLM", features="qkv bias"),
    Family("apertus", "ApertusConfig", "ApertusForCausalLM", features="xIELU, q/k norm"),
    Family("phimoe", "PhimoeConfig", "PhimoeForCausalLM",
           {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, "MoE"),
    Family("llama4-text", "Llama4TextConfig", "Llama4ForCausalLM",
           {"attention_chunk_size": WINDOW, "num_local_experts": 2, "intermediate_size_mlp": 128,
            "layer_types": ["chunked_attention", "full_attention"], "no_rope_layers": [1, 0],
            "floor_scale": 16},  # its NoPE layer's attention temperature then changes every 16 positions
           "chunked attention, NoPE temperature"),
    # hybrids: linear-attention / state-space layers (a recurrent state, no KV: cache/recurrent.py) beside attention
    Family("qwen3-next", "Qwen3NextConfig", "Qwen3NextForCausalLM",
           {"layer_types": ["linear_attention", "full_attention"], **_MOE, "shared_expert_intermediate_size": 32,
            **_DELTA}, "hybrid: gated DeltaNet, MoE"),
    Family("qwen3.5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
           {"layer_types": ["linear_attention", "full_attention"], **_DELTA}, "hybrid: gated DeltaNet"),
    Family("qwen3.5-moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
           {"layer_types": ["linear_attention", "full_attention"], **_MOE, "shared_expert_intermediate_size": 32,
            **_DELTA}, "hybrid: gated DeltaNet, MoE"),
    Family("jamba", "JambaConfig", "JambaForCausalLM",
           {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
            "num_experts": 2, "num_experts_per_tok": 1, "mamba_d_state": 8, "mamba_expand": 2, "mamba_dt_rank": 8,
            "head_dim": None, "use_mamba_kernels": False}, "hybrid: Mamba, MoE"),
    Family("bamba", "BambaConfig", "BambaForCausalLM",
           {"attn_layer_indices": [1], **_MAMBA2, "head_dim": None}, "hybrid: Mamba-2"),
    Family("granitemoehybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
           {"layer_types": ["mamba", "attention"], **_MAMBA2, "num_local_experts": 2, "num_experts_per_tok": 1,
            "head_dim": None}, "hybrid: Mamba-2, MoE (Granite 4)"),
    Family("nemotron-h", "NemotronHConfig", "NemotronHForCausalLM",
           {"num_hidden_layers": 3, "hybrid_override_pattern": "M-*", "mamba_num_heads": 4, "mamba_head_dim": 32,
            "ssm_state_size": 8, "n_groups": 1, "head_dim": None}, "hybrid: Mamba-2, an MLP-only layer"),
    Family("olmo-hybrid", "OlmoHybridConfig", "OlmoHybridForCausalLM",
           {"layer_types": ["linear_attention", "full_attention"]}, "hybrid: gated DeltaNet"),
    Family("lfm2", "Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]},
           "hybrid: short convolutions"),
    Family("kimi-linear", "KimiLinearConfig", "KimiLinearForCausalLM",
           {"layer_types": ["linear_attention", "full_attention"], **_MLA, "linear_head_dim": 8,
            "linear_num_heads": 4, **_MOE}, "hybrid: Kimi delta attention, MLA, MoE"),
    Family("bailing-hybrid", "BailingHybridConfig", "BailingHybridForCausalLM",
           {"layer_types": ["linear_attention", "full_attention"], **_MLA, **_MOE}, "hybrid: linear attention, MLA, MoE"),
    Family("falcon-h1", "FalconH1Config", "FalconH1ForCausalLM",
           {"mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 64,
            "head_dim": None}, "hybrid: attention and Mamba-2 side by side in every layer"),
    Family("zamba2", "Zamba2Config", "Zamba2ForCausalLM",
           {"layers_block_type": ["linear_attention", "hybrid"], "mamba_d_state": 8, "mamba_headdim": 16,
            "n_mamba_heads": 8, "num_mem_blocks": 1, "head_dim": None, "adapter_rank": 8,
            "use_shared_attention_adapter": False}, "hybrid: Mamba-2, one attention block shared by its hybrid layers"),
    # decoder families of transformers 5.24 run with the tiny defaults alone (a survey of every
    # causal-LM type families.py did not name; each one token-identical to generate, methods reach 0.5)
    Family("glm", "GlmConfig", "GlmForCausalLM", features="partial rotary (0.5)"),
    Family("ernie4_5", "Ernie4_5Config", "Ernie4_5ForCausalLM"),
    Family("ernie4_5-moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", features="MoE"),
    Family("hunyuan-dense", "HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM"),
    Family("hunyuan-moe", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", features="MoE"),
    Family("ministral", "MinistralConfig", "MinistralForCausalLM", _SLIDING, "sliding window"),
    Family("ministral3", "Ministral3Config", "Ministral3ForCausalLM"),
    Family("olmo", "OlmoConfig", "OlmoForCausalLM"),
    Family("qwen2-moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", features="MoE, shared expert"),
    Family("helium", "HeliumConfig", "HeliumForCausalLM"),
    Family("minimax-m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM", features="MoE"),
    Family("exaone-moe", "ExaoneMoeConfig", "ExaoneMoeForCausalLM", features="MoE"),
    Family("arcee", "ArceeConfig", "ArceeForCausalLM"),
    Family("bitnet", "BitNetConfig", "BitNetForCausalLM", features="ternary-weight layers"),
    Family("persimmon", "PersimmonConfig", "PersimmonForCausalLM", features="partial rotary (0.5)"),
    Family("jetmoe", "JetMoeConfig", "JetMoeForCausalLM", features="MoE (attention experts too)"),
    Family("granitemoeshared", "GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", features="MoE"),
    Family("doge", "DogeConfig", "DogeForCausalLM", features="MoE"),
    Family("flex-olmo", "FlexOlmoConfig", "FlexOlmoForCausalLM", features="MoE"),
    Family("cohere2-moe", "Cohere2MoeConfig", "Cohere2MoeForCausalLM", features="MoE"),
    Family("apertus1.5", "Apertus1p5TextConfig", "Apertus1p5TextForCausalLM"),
    Family("vaultgemma", "VaultGemmaConfig", "VaultGemmaForCausalLM", features="alternating window, softcap"),
    Family("mimo-v2-flash", "MiMoV2FlashConfig", "MiMoV2FlashForCausalLM",
           features="MoE, alternating window, values wider than keys"),
    Family("afmoe", "AfmoeConfig", "AfmoeForCausalLM", features="MoE"),
    Family("aria-text", "AriaTextConfig", "AriaTextForCausalLM", features="MoE"),
    Family("flint", "FlintConfig", "FlintForCausalLM", features="MoE"),
    Family("granite-swa", "GraniteSWAConfig", "GraniteSWAForCausalLM", features="alternating window"),
    Family("granitemoe-swa", "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", features="MoE, alternating window"),
    Family("hy-v3", "HYV3Config", "HYV3ForCausalLM", features="MoE"),
    Family("hyperclovax", "HyperCLOVAXConfig", "HyperCLOVAXForCausalLM"),
    Family("jais2", "Jais2Config", "Jais2ForCausalLM"),
    Family("kolibri1", "Kolibri1Config", "Kolibri1ForCausalLM", features="MoE"),
    Family("laguna", "LagunaConfig", "LagunaForCausalLM", features="MoE"),
    Family("lara-mini", "LaraMiniConfig", "LaraMiniForCausalLM", features="MoE, hybrid: linear attention + window"),
    Family("mellum", "MellumConfig", "MellumForCausalLM", features="MoE"),
    Family("nanochat", "NanoChatConfig", "NanoChatForCausalLM"),
    Family("solar-open", "SolarOpenConfig", "SolarOpenForCausalLM", features="MoE"),
    Family("zaya", "ZayaConfig", "ZayaForCausalLM", features="MoE"),
    # decoder layers that pass no keyword arguments on to self-attention (lcbench's per-forward
    # state travels beside the call, engine/carried.py, so they run)
    Family("stablelm", "StableLmConfig", "StableLmForCausalLM", features="partial rotary (0.25)"),
    Family("nemotron", "NemotronConfig", "NemotronForCausalLM", features="partial rotary (0.5)"),
    # decoder families that need settings of their own to build a tiny model
    Family("falcon", "FalconConfig", "FalconForCausalLM", {**_FALCON, "new_decoder_architecture": True},
           "fused grouped qkv, parallel attention (Falcon-40B/180B)"),
    Family("falcon-mq", "FalconConfig", "FalconForCausalLM", {**_FALCON, "multi_query": True},
           "multi-query, parallel attention (Falcon-7B)"),
    Family("dbrx", "DbrxConfig", "DbrxForCausalLM",
           {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 1024,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
            "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
            "head_dim": None, "intermediate_size": None, "max_position_embeddings": None}, "MoE, fused qkv, clipped qkv"),
    Family("dots1", "Dots1Config", "Dots1ForCausalLM",
           {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
            "n_group": 1, "topk_group": 1, "n_shared_experts": 1}, "MoE, shared expert"),
    Family("longcat-flash", "LongcatFlashConfig", "LongcatFlashForCausalLM",
           {**_MLA_Q, "head_dim": 8, "num_layers": 1, "num_hidden_layers": None, "n_routed_experts": 4, "moe_topk": 2,
            "expert_ffn_hidden_size": 32, "ffn_hidden_size": 128, "zero_expert_num": 1},
           "two attention blocks per layer, MLA, MoE with zero experts"),
    Family("glm4-moe-lite", "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
           {**_MLA_Q, **_MLA_MOE, "head_dim": None}, "MLA, MoE"),
    Family("minicpm3", "MiniCPM3Config", "MiniCPM3ForCausalLM", {**_MLA_Q, "head_dim": None}, "MLA"),
    Family("sarvam-mla", "SarvamMLAConfig", "SarvamMLAForCausalLM",
           {**_MLA_Q, **_MLA_MOE, "first_k_dense_replace": 1, "head_dim": None}, "MLA, MoE"),
    Family("youtu", "YoutuConfig", "YoutuForCausalLM", {**_MLA_Q, "head_dim": None}, "MLA"),
    Family("codegen", "CodeGenConfig", "CodeGenForCausalLM", {**_GPT_SHAPE, "rotary_dim": 8},
           "partial rotary (8 of 16), parallel residual, fused qkv"),
    Family("gptj", "GPTJConfig", "GPTJForCausalLM", {**_GPT_SHAPE, "rotary_dim": 8},
           "partial interleaved rotary (8 of 16), parallel residual"),
    Family("cwm", "CwmConfig", "CwmForCausalLM", {**_ALT, "bos_token_id": 0}, "alternating window"),
    Family("lfm2-moe", "Lfm2MoeConfig", "Lfm2MoeForCausalLM",
           {"layer_types": ["conv", "full_attention"], "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "num_dense_layers": 1}, "hybrid: short convolutions, MoE"),
    # transformers 5.25's decoder types the first survey (5.24) did not have or skipped
    Family("beam", "BeamConfig", "BeamForCausalLM", {**_ALT, **_MOE}, "alternating window, MoE"),
    Family("ergo", "ErgoConfig", "ErgoForCausalLM", {**_ALT, **_MOE}, "alternating window, MoE"),
    Family("gemma4-unified-text", "Gemma4UnifiedTextConfig", "Gemma4UnifiedForCausalLM", {**_ALT, **_PER_LAYER_INPUT},
           "alternating window"),
    Family("exaone", "ExaoneConfig", "LlamaForCausalLM", features="legacy EXAONE checkpoints (loaded as Llama)"),
    Family("internlm3", "InternLM3Config", "LlamaForCausalLM", features="loaded as Llama"),
    Family("iquestcoder", "IQuestCoderConfig", "LlamaForCausalLM", features="loaded as Llama"),
    Family("minicpm5-moe", "MiniCPM5MoeConfig", "MiniCPM5MoeForCausalLM", features="MoE"),
    Family("minimax-m3-vl-text", "MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", features="MoE"),
    Family("param2moe", "Param2MoeConfig", "Glm4MoeForCausalLM", features="MoE (loaded as GLM-4-MoE)"),
    Family("sarvam-moe", "SarvamMoEConfig", "Glm4MoeForCausalLM", features="MoE (loaded as GLM-4-MoE)"),
    Family("cohere-compass-text", "CohereCompassTextConfig", "CohereCompassForCausalLM",
           {**_ALT, "rope_parameters": {kind: {"rope_type": "default", "rope_theta": 10000.0}
                                        for kind in ("full_attention", "sliding_attention")}},
           "alternating window, rotary per layer kind"),
    Family("axk1", "AXK1Config", "AXK1ForCausalLM", {**_MLA_Q, **_MLA_MOE, "head_dim": 8}, "MLA (low-rank queries), MoE"),
    Family("zamba", "ZambaConfig", "ZambaForCausalLM",
           {"num_hidden_layers": 3, "attn_layer_period": 2, "attn_layer_offset": 1, "attention_head_dim": 32,
            "n_mamba_heads": 2, "mamba_d_state": 8, "mamba_dt_rank": 8, "num_key_value_heads": 4, "head_dim": None},
           "hybrid: Mamba layers, one shared attention block"),
    Family("lfm3", "Lfm3Config", "Lfm3ForCausalLM", {"layer_types": ["conv", "sliding_attention", "conv", "full_attention"],
                                                     "num_hidden_layers": 4, "sliding_window": WINDOW},
           "hybrid: short convolutions, window and global attention"),
    Family("biogpt", "BioGptConfig", "BioGptForCausalLM", features="learned positions"),
    Family("ctrl", "CTRLConfig", "CTRLLMHeadModel", features="sinusoidal positions"),
    # refused, each with its reason (the survey's clean refusals)
    Family("deepseek-v4", "DeepseekV4Config", "DeepseekV4ForCausalLM", features="compressed sparse attention"),
    Family("axk2", "AXK2Config", "AXK2ForCausalLM", features="indexed (sparse) attention"),
    Family("qwen4-exp-text", "Qwen4ExpTextConfig", "Qwen4ExpForCausalLM",
           {"layer_types": ["linear_attention", "indexed_attention"]}, "hybrid: linear and indexed attention"),
    Family("inkling-text", "InklingTextConfig", "InklingForCausalLM", features="attention position bias"),
    Family("hrm-text", "HrmTextConfig", "HrmTextForCausalLM", features="own attention code (recurrent modules)"),
    Family("xglm", "XGLMConfig", "XGLMForCausalLM", features="own attention code"),
    Family("openai-gpt", "OpenAIGPTConfig", "OpenAIGPTLMHeadModel", features="own attention code"),
    Family("dory", "DoryConfig", "DoryForCausalLM", features="several attention calls per layer"),
    Family("glm-moe-dsa", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", features="indexed (sparse) attention"),
    Family("hy-v4", "HYV4Config", "HYV4ForCausalLM", features="indexed (sparse) attention"),
    Family("bloom", "BloomConfig", "BloomForCausalLM", features="own attention code (ALiBi)"),
    Family("mpt", "MptConfig", "MptForCausalLM", features="own attention code (ALiBi)"),
    Family("gpt-neo", "GPTNeoConfig", "GPTNeoForCausalLM",
           {"num_layers": 2, "num_heads": 4, "attention_types": [[["local", "global"], 1]], "window_size": WINDOW,
            "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None, "head_dim": None},
           "own attention code (local/global)"),
    Family("minimax", "MiniMaxConfig", "MiniMaxForCausalLM",
           features="hybrid: lightning (linear) attention, its own cache type"),
    Family("diffllama", "DiffLlamaConfig", "DiffLlamaForCausalLM", features="differential attention"),
    Family("deepseek-v3.2", "DeepseekV32Config", "DeepseekV32ForCausalLM", features="indexed (sparse) attention"),
    Family("mamba", "MambaConfig", "MambaForCausalLM", {}, "no attention layer"),
    Family("falcon-alibi", "FalconConfig", "FalconForCausalLM", {**_FALCON, "num_kv_heads": 4, "multi_query": False,
            "alibi": True}, "ALiBi in the attention mask (Falcon-RW)"),
    Family("deepseek-v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
           {"kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 12, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4,
            "head_dim": 8}, "MoE"),
    Family("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
           {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 12, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4,
            "head_dim": 8}, "MoE, low-rank queries"),
)


def family(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"no family '{name}'; known: {', '.join(f.name for f in FAMILIES)}")


def tiny_config_kwargs(tokenizer) -> dict[str, Any]:
    """The settings every tiny model shares (a family's overrides replace them; ``None`` drops one)."""
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None, tie_word_embeddings=False)


def tiny_config(fam: Family):
    """The config of the family's tiny model (what the config-only refusals read)."""
    import transformers

    from .tiny import tiny_tokenizer

    kwargs = tiny_config_kwargs(tiny_tokenizer())
    kwargs.update(fam.overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("sliding_window", "bos_token_id", "q_lora_rank")}
    return getattr(transformers, fam.config)(**kwargs)


def build(fam: Family, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """The family's tiny random model (``attn_implementation`` as transformers loads it), in eval mode."""
    import transformers

    from .tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config(fam)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model)(cfg).to(dtype).eval()
    if fam.strong_sinks:  # random init leaves the sinks near 0, too weak to matter in a tiny model
        with torch.no_grad():
            for module in model.modules():
                if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                    module.sinks.copy_(torch.linspace(-1.0, 4.0, module.sinks.numel()))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model
