"""Storage with room to grow along the token axis, so an append does not copy the whole layer.

``torch.cat([held, new], dim=2)`` at every decode step copies everything a layer holds: at 4K
tokens that copy, not attention, was most of a CPU decode step (issue #14). :func:`extend` writes
the new slots into spare room kept after the held ones instead, and allocates (copying once) only
when the room runs out, ``GROW`` slots — or the new block, if longer — at a time. What a layer
holds is always the *view* of the leading slots; that view is what it counts in ``nbytes`` (the
room is at most ``GROW`` slots per tensor, real memory that the measured peak includes).

The room is reused only while the view is exactly the leading slots of its base (same storage,
start, strides and non-token dims): a layer that replaced its tensor (``select`` gathers, a
method assigned a new one) gets new room on its next append. A layer that shortens its view
(``crop_to``) must drop the base, since an older, longer view of the same slots may still be held
by someone and the next append would overwrite it.
"""

from __future__ import annotations

import torch

GROW = 256  # slots of room added along dim 2 when a tensor must grow


def _leads(view: torch.Tensor, base: torch.Tensor | None) -> bool:
    """True when ``view`` is ``base[:, :, :n]`` for its own ``n``."""
    return (base is not None and view.data_ptr() == base.data_ptr() and view.dtype == base.dtype
            and view.device == base.device and view.shape[:2] == base.shape[:2] and view.shape[3:] == base.shape[3:]
            and view.stride() == base.stride())


def extend(view: torch.Tensor, base: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``view`` followed by ``new`` along dim 2, as ``(the new view, its base)``: ``new`` is written
    into ``base``'s room when ``view`` leads it and the room is large enough, else both are copied
    into a new base with room for ``max(GROW, new)`` more slots. Values equal
    ``torch.cat([view, new], dim=2)`` (``new`` is cast to ``view``'s dtype)."""
    used, need = view.shape[2], view.shape[2] + new.shape[2]
    if not _leads(view, base) or base.shape[2] < need:
        base = torch.empty((*view.shape[:2], need + max(new.shape[2], GROW), *view.shape[3:]), dtype=view.dtype,
                           device=view.device)
        base[:, :, :used] = view
    base[:, :, used:need] = new
    return base[:, :, :need], base


def grow(layer, name: str, new: torch.Tensor) -> None:
    """``layer.<name>`` extended by ``new`` along dim 2 (:func:`extend`); the bases are kept in the
    layer's ``_room`` dict, rebound (never mutated) so a layer copied by ``__dict__`` shares none."""
    room = layer.__dict__.get("_room", {})
    view, base = extend(getattr(layer, name), room.get(name), new)
    setattr(layer, name, view)
    layer._room = {**room, name: base}


def drop_room(layer) -> None:
    """Forget ``layer``'s room (its next append copies into new storage)."""
    layer._room = {}
