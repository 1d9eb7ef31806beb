"""ThinK: prune the key channels the recent queries use least; every token stays.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025 (arXiv:2407.21018). Per
KV head, channel ``c`` scores ``mean_w q_c² · mean_t k_c²`` — the energy of the last
``window_size`` queries (averaged over the KV group's query heads) times the keys' — and the
lowest-scoring channels of the context's keys are dropped. Keys are half of the KV memory, so
``--ratio r`` prunes ``round(2·r·D)`` of the ``D`` key channels: ThinK alone reaches ratios below
0.5 (at least one channel is kept); above that it is refused — chain it with a token method
(``think+snapkv``). The kept keys are stored compact (:class:`~lcbench.cache.channels.ChannelLayer`),
so bytes fall with the channels. Read against kvpress 0.5.5 ``kvpress/presses/think_press.py``
(ThinKPress, which zeroes the channels in a full-width cache), whose pruned channels this method
matches exactly (tests/test_kvpress_presses.py).
"""


from ...cache.channels import ChannelLayer
from ...errors import UserError
from ...params import Param
from ..base import Needs, Stage
from .select import context_slots, group_mean


def pruned_channels(head_dim: int, ratio: float) -> int:
    """Key channels to drop so that a share ``ratio`` of the KV memory (keys + values) goes."""
    return round(2 * ratio * head_dim)


class ThinK(Stage):
    name = "think"
    family = "kv_dropping"
    token_budget = False  # it prunes key channels, not tokens
    paper = "Xu et al., ThinK: Thinner Key Cache by Query-Driven Pruning, ICLR 2025 (arXiv:2407.21018)"
    summary = "query-driven key-channel pruning (q² × k² per channel); ratios below 0.5; compact key storage"
    params = (Param("window_size", int, 32, "last prompt queries whose energy scores the channels", min=1),)
    max_ratio = 0.5  # ratios at or above it are refused (UserError): keys are half of the KV memory

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        if self.ratio >= self.max_ratio:
            raise UserError(f"think prunes key channels only, and keys are half of the KV memory, so it removes less "
                            f"than half of it; --ratio {self.ratio} cannot be reached. Fix: use a ratio below 0.5, or "
                            f"chain it with a token method, e.g. --method think+snapkv --method-args think.ratio=0.25.")
        self.needs = Needs(window=self.args["window_size"], window_queries=True)

    def compress_layer(self, layer, seen):
        if self.ratio <= 0:
            return layer
        keys, _ = layer.dense()
        d = keys.shape[-1]
        drop = min(d - 1, pruned_channels(d, self.ratio))
        if drop <= 0:
            return layer
        queries = seen.window_queries[:, :, -self.args["window_size"]:].float()  # (B, Hq, w, D)
        q_energy = group_mean(queries.pow(2).mean(2), seen.num_groups)  # (B, H, D)
        n = layer.seq_len() if seen.protected == 0 else context_slots(layer, seen) + seen.protected
        held = keys[:, :, :n].float().pow(2)
        if layer.valid is not None:  # padding has no energy
            held = held * layer.valid[..., :n, None]
        scores = q_energy * held.mean(2)
        keep = scores.topk(d - drop, dim=-1).indices
        return ChannelLayer.from_layer(layer, keep)
