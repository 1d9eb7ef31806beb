"""Sparse attention: prefill/decode attention that computes only selected blocks."""

BUILTIN: dict[str, str] = {
    "ashape": "lcbench.methods.sparse.shapes:AShape",
    "trishape": "lcbench.methods.sparse.shapes:TriShape",
    "vertical_slash": "lcbench.methods.sparse.vertical_slash:VerticalSlash",
    "block_topk": "lcbench.methods.sparse.block_topk:BlockTopK",
    "quest": "lcbench.methods.sparse.quest:Quest",
}
