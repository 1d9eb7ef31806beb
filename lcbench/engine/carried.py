"""What one model call hands lcbench's attention functions besides q/k/v: the forward's
:class:`~.state.ForwardState`, a prompt compressor's :class:`~lcbench.methods.prompt.attend.Readout`,
a calibration's capture callback.

These travel in a context variable set around the call (:func:`carrying`), not as keyword
arguments of the model's forward. transformers hands a forward's extra keywords down to the
attention function only where every decoder layer passes its ``**kwargs`` on to self-attention,
and some do not: StableLM's and Nemotron's decoder layers (transformers 5.24/5.25,
``modeling_stablelm.StableLmDecoderLayer.forward``, ``modeling_nemotron.NemotronDecoderLayer.forward``)
call ``self.self_attn(...)`` with named arguments only, so a keyword never arrived and those
models were refused although their attention dispatches through ``ALL_ATTENTION_FUNCTIONS``.

A call sees exactly what its caller set (:func:`carrying` replaces, it does not merge): a model
call made while another is under way (a stage scoring with the model) sets its own values, and
nothing of the outer call's leaks into it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

_CARRIED: ContextVar[Mapping[str, Any]] = ContextVar("lcbench_carried", default=MappingProxyType({}))


@contextlib.contextmanager
def carrying(**values: Any) -> Iterator[None]:
    """Model calls made inside this block hand ``values`` to lcbench's attention functions
    (read with :func:`carried`); the values the enclosing block set come back when it ends."""
    token = _CARRIED.set(MappingProxyType(dict(values)))
    try:
        yield
    finally:
        _CARRIED.reset(token)


def carried(name: str) -> Any:
    """The value the model call under way carries as ``name``, or None."""
    return _CARRIED.get().get(name)
