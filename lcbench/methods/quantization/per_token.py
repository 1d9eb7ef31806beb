"""Per-token integer KV quantization (int8, int4): every token's keys and values are quantized
over groups of ``group_size`` channels (one scale and zero each), as in Hugging Face
transformers' ``QuantizedCache`` (Quanto/HQQ backends, per-token axis) and the KV-quantization
baselines of KIVI (Liu et al., ICML 2024, arXiv:2402.02750). The most recent ``window`` tokens
stay in full precision; ``window=-1`` lets the ratio choose it (:mod:`.plan`). While decoding, the
tokens leaving the window are quantized ``block`` at a time (``QuantSpec.decode_block``), as
``QuantizedCache`` quantizes its residual of ``residual_length`` tokens at once
(transformers ``cache_utils.QuantizedLayer.update``); ``block=1`` quantizes each as it leaves."""

from ...params import Param
from .plan import QuantizeStage

PER_TOKEN_PARAMS = (
    Param("group_size", int, None, "channels sharing one scale (the whole head when it does not divide it)", min=1),
    Param("window", int, None, "recent tokens kept in full precision; -1 = the longest the ratio allows", min=-1),
    Param("block", int, None, "while decoding, tokens past the window are quantized this many at a time", min=1),
)


class Int8(QuantizeStage):
    name = "int8"
    family = "kv_quantization"
    latent_cache = True  # selects slots by the observation / quantizes the cached numbers (MLA latents too)
    paper = ("per-token INT8 KV quantization (transformers QuantizedCache; baseline in KIVI, ICML 2024, "
             "arXiv:2402.02750)")
    summary = "8-bit per-token quantization of keys and values, full-precision recent window"
    tolerance = 0.05
    defaults = {"group_size": 64, "window": -1, "block": 32}
    params = PER_TOKEN_PARAMS

    def bits_options(self):
        return (8,)


class Int4(QuantizeStage):
    name = "int4"
    family = "kv_quantization"
    latent_cache = True
    paper = ("per-token INT4 KV quantization (transformers QuantizedCache; baseline in KIVI, ICML 2024, "
             "arXiv:2402.02750)")
    summary = "4-bit per-token quantization of keys and values, full-precision recent window"
    tolerance = 0.05
    defaults = {"group_size": 64, "window": -1, "block": 32}
    params = PER_TOKEN_PARAMS

    def bits_options(self):
        return (4,)
