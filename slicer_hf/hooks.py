"""KV-cache-aware hooks on decoder layers: the same model object can act as the edge (layers `0..k-1`) or as
the server (layers `k..L-1`) of a split, for the duration of one forward pass.

Each decoder layer gets a tiny hook (attach / detach restore the module exactly, chained on top of any hook
already there, such as accelerate's). Outside a split the hooks pass every call straight through. Inside one,
the active `SplitPlan` (a context variable, so nested and concurrent forwards do not interfere) decides:

    edge   (k): layers < k run; layer k hands the hidden states to `plan.exchange` and returns what the server
                sent back (the final hidden states); layers > k pass that through untouched.
    server (k): layer 0 returns `plan.inject` (the decoded hidden states); layers < k pass it on; layers >= k run;
                the last layer's output is kept in `plan.final`. A batch of rows split at different layers
                (sorted by split) sets `plan.rows_at`: layer j runs for its first `rows_at(j)` rows only, the
                others pass through; k is then the shallowest split in the batch.

A layer that does not run on this side still records its positions in the cache (see
`compat.phantom_cache_update`), so masks and positions are computed exactly as in the unsplit model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import compat
from .errors import SlicerError

_ACTIVE: contextvars.ContextVar[SplitPlan | None] = contextvars.ContextVar("slicer_split_plan", default=None)


@dataclass
class SplitPlan:
    """What one side does during one forward pass of a split model."""

    role: str  # "edge" or "server"
    split_layer: int
    # edge: (hidden at the split, the patch grid where the block takes one) -> the last block's output
    exchange: Callable[[torch.Tensor, tuple[int, int] | None], torch.Tensor] | None = None
    inject: torch.Tensor | None = None  # server: decoded hidden states entering layer k, [B, T, d] (or [B, C, H, W])
    final: torch.Tensor | None = field(default=None, repr=False)  # server: last layer output
    store: Any = None  # server: the `StoreBatch` standing in for the cache
    rows_at: Callable[[int], int] | None = None  # server, mixed split layers: rows that run layer j


def active_plan() -> SplitPlan | None:
    """The plan of the forward pass running in this context, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def split_plan(plan: SplitPlan) -> Iterator[SplitPlan]:
    token = _ACTIVE.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE.reset(token)


class LayerHook:
    """Wraps one decoder layer's `forward`; `detach` puts back exactly what was there."""

    def __init__(self, module: nn.Module, layer_idx: int, num_layers: int) -> None:
        self.module, self.layer_idx, self.num_layers = module, layer_idx, num_layers
        self._had_instance_forward = "forward" in module.__dict__
        self._inner = module.forward  # bound method, or a hook chain (accelerate) already installed
        self._signature = compat.layer_signature(type(module).forward.__get__(module))
        self._arity = compat.layer_output_arity(type(module))
        module.forward = self
        module._slicer_hook = self

    def detach(self) -> None:
        if self._had_instance_forward:
            self.module.forward = self._inner
        else:
            del self.module.forward
        del self.module._slicer_hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plan = _ACTIVE.get()
        if plan is None:
            if self.layer_idx == 0 and hasattr(compat.layer_call(self._signature, args, kwargs)[1], "_slicer_mark"):
                raise SlicerError(
                    "this KV cache was made by split generation: the layers past the split hold placeholders there "
                    "(their keys and values are on the server), so the whole model cannot continue it; continue it "
                    "split, or start again from the whole prompt"
                )
            return self._inner(*args, **kwargs)
        i, k = self.layer_idx, plan.split_layer
        runs_here = i < k if plan.role == "edge" else i >= k
        if runs_here:
            out = self._run_rows(plan, args, kwargs)
            if plan.role == "server" and i == self.num_layers - 1:
                plan.final = compat.layer_hidden(out)
            return out
        hidden, cache = compat.layer_call(self._signature, args, kwargs)
        if plan.store is None:
            compat.phantom_cache_update(cache, i, hidden)
        if plan.role == "edge" and i == k:
            hidden = plan.exchange(hidden, compat.layer_grid(self._signature, args, kwargs))
        elif plan.role == "server" and i == 0:
            hidden = plan.inject
        return compat.layer_output(self._arity, hidden)

    def _run_rows(self, plan: SplitPlan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the layer, on the leading rows split at or below it when the batch mixes split layers."""
        if plan.rows_at is None:
            return self._inner(*args, **kwargs)
        hidden, _ = compat.layer_call(self._signature, args, kwargs)
        rows = plan.rows_at(self.layer_idx)
        if rows == hidden.shape[0]:
            return self._inner(*args, **kwargs)
        args, kwargs = compat.take_rows(args, kwargs, rows, hidden.shape[0])
        ran = compat.layer_hidden(self._inner(*args, **kwargs))
        return compat.layer_output(self._arity, torch.cat([ran, hidden[rows:]]))


def attach_hooks(model: nn.Module) -> list[LayerHook]:
    """Hook every block of `model` (idempotent)."""
    layers = compat.decoder_layers(model)
    if all(hasattr(layer, "_slicer_hook") for layer in layers):
        return [layer._slicer_hook for layer in layers]
    return [LayerHook(layer, i, len(layers)) for i, layer in enumerate(layers)]


def detach_hooks(model: nn.Module) -> None:
    for layer in compat.decoder_layers(model):
        if hasattr(layer, "_slicer_hook"):
            layer._slicer_hook.detach()
