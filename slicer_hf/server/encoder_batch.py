"""One-shot encoder requests (text encoders, ViT, Swin, CNNs) on the server: requests of several clients that
share a split layer and a shape run as one forward.

Text requests of different lengths share a forward too: each is padded to the longest with masked positions,
which no valid position attends to. Vision requests batch when their grids match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import compat, protocol
from ..codec.base import MACHINE_ERRORS
from ..errors import ProtocolError
from ..hooks import SplitPlan, split_plan

if TYPE_CHECKING:
    from .engine import SplitServer
    from .scheduler import Work


def batch_key(server: SplitServer, work: Work) -> tuple[Any, ...]:
    """Requests with equal keys run in one forward."""
    step = work.step
    tokens = None if server.encoder_kind == "text" else step.tokens
    return work.session.split_layer, tokens, step.grid, work.hidden.dtype


@torch.inference_mode()
def run_encoder_batch(server: SplitServer, works: list[Work]) -> list[tuple[bytes, int] | Exception]:
    """Blocks `k..L-1` for every request in `works` (one split layer, one key), in one forward; each request's
    reply is the last block's output: `[b, t, d]` rows, or a CNN's map channels-last `[b, H', W', C']`. Once the
    forward has run, a reply that cannot be encoded (rows that overflowed to inf) is its request's error alone."""
    model, kind = server.model, server.encoder_kind
    split_layer, grid = works[0].session.split_layer, works[0].step.grid
    longest = max(w.step.tokens for w in works)
    hidden = torch.cat([_pad(w.hidden, longest) for w in works])  # [B, T, d]
    mask = None
    if kind == "text" and any(w.step.mask is not None or w.step.tokens < longest for w in works):
        mask = torch.cat([_pad_mask(w, longest) for w in works])
    if kind == "map":  # rows of a feature map -> [B, C, H, W], laid out as the model's stages leave it
        hidden = hidden.reshape(hidden.shape[0], *grid, hidden.shape[-1]).permute(0, 3, 1, 2)
        hidden = hidden.contiguous(memory_format=compat.map_memory_format(model.config))
    inputs = compat.encoder_inputs(model, hidden.shape[0], longest, split_layer, grid, mask)
    plan = SplitPlan("server", split_layer, inject=hidden)  # decoded on the server's device, in its dtype
    base = model.base_model
    try:
        # the base model's own forward (not the split one)
        with split_plan(plan), compat.kept_window_sizes(model), compat.outside_blocks_in_eval(model):
            getattr(type(base), "_slicer_base", type(base)).forward(base, **inputs)
    except (RuntimeError, ValueError, IndexError) as exc:
        if len(works) > 1 or isinstance(exc, MACHINE_ERRORS):  # alone again, or the server's own fault
            raise
        shape = f"a {grid[0]} x {grid[1]} grid" if grid is not None else f"{longest} positions"
        raise ProtocolError(  # an input the model's own forward cannot take either (a map too small to downsample)
            f"blocks {split_layer}.. of this model cannot run {shape}: {protocol.clipped(str(exc), 200)}",
            code="bad_request",
        ) from exc
    final = plan.final
    if final.ndim == 4:  # [B, C, H, W] -> channels-last, the rows the edge reads back
        final = final.permute(0, 2, 3, 1).contiguous()
    replies, r0 = [], 0
    for work in works:
        out = final[r0 : r0 + work.rows]
        if kind == "text":
            out = out[:, : work.step.tokens]
        r0 += work.rows
        try:
            replies.append(server.encode_output(work.session, out))
        except Exception as exc:  # not the forward's: the others' replies stand
            replies.append(exc)
    return replies


def _pad(hidden: torch.Tensor, tokens: int) -> torch.Tensor:
    if hidden.shape[1] == tokens:
        return hidden
    return torch.cat([hidden, hidden.new_zeros(hidden.shape[0], tokens - hidden.shape[1], hidden.shape[2])], 1)


def _pad_mask(work: Work, tokens: int) -> torch.Tensor:
    mask = torch.zeros(work.rows, tokens, dtype=torch.bool)
    mask[:, : work.step.tokens] = True if work.step.mask is None else work.step.mask
    return mask
