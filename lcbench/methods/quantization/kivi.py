"""KIVI: 2- or 4-bit asymmetric KV quantization, keys per channel, values per token.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
(arXiv:2402.02750). Keys are quantized per channel over groups of ``group_size`` tokens (their
outliers live in fixed channels), values per token over groups of ``group_size`` channels; the
most recent tokens stay in full precision (the paper's residual, here ``window``) and are
quantized a whole group at a time once they fall out of it, also during decoding. ``bits=0`` and
``window=-1`` let the ratio choose them (:mod:`.plan`): 4 bits when enough, else 2.
"""

from ...params import Param
from .plan import QuantizeStage


class KIVI(QuantizeStage):
    name = "kivi"
    family = "kv_quantization"
    latent_cache = True  # selects slots by the observation / quantizes the cached numbers (MLA latents too)
    paper = ("Liu et al., KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, ICML 2024 "
             "(arXiv:2402.02750)")
    summary = ("2/4-bit asymmetric quantization, keys per channel, values per token, full-precision recent "
               "window")
    tolerance = 0.05
    defaults = {"bits": 0, "group_size": 32, "window": -1}
    key_axis = "channel"
    params = (
        Param("bits", int, None, "2 or 4; 0 = chosen from the ratio", choices=(0, 2, 4)),
        Param("group_size", int, None, "tokens per key group / channels per value group", min=1),
        Param("window", int, None, "recent tokens kept in full precision; -1 = the longest the ratio allows", min=-1),
    )

    def bits_options(self):
        return (4, 2) if self.args["bits"] == 0 else (self.args["bits"],)
