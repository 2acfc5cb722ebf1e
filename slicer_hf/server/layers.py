"""`ServedLayers`: a model's layers from a split layer to the end, run for the server, with each session's K/V
in its own transformers cache or in the server's block store (`kvstore.py`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import PreTrainedModel

from .. import compat
from ..errors import ConfigError
from ..hooks import SplitPlan, split_plan
from .kvstore import KVStore, Row, StoreBatch, store_attention

logger = logging.getLogger(__name__)


class ServedLayers:
    """The layers a server runs (its hooks attached), and the KV store they keep K/V in, if any.

    Args:
        model: the model, its hooks attached (`hooks.attach_hooks`).
        min_split_layer: the shallowest split served.
        kv_store: keep K/V in a block store where the architecture allows (checked here, once, against the
            model's own cache); otherwise `store` is None and every forward takes a transformers cache.
        kv_budget_bytes: what the store may hold, all sessions together.
    """

    def __init__(self, model: PreTrainedModel, min_split_layer: int, kv_store: bool, kv_budget_bytes: int) -> None:
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.min_split_layer = min_split_layer
        self.store: KVStore | None = None
        self._cache_costs: list[tuple[int, int]] | None = None  # measured on first use (`kv_costs`)
        if kv_store and compat.route_attention(model, store_attention):
            num_layers = compat.num_layers(model.config)
            self.store = KVStore(num_layers, self.device, self.dtype, sliding_windows=compat.sliding_windows(model))
            if self._store_matches_cache(min_split_layer):
                self.store.trim()  # what the check's rows took (up to 512 positions), within the budget from the start
                self.store.max_bytes = kv_budget_bytes  # from now on: what admission lets sessions hold
            else:
                self.store = None

    @functools.cached_property
    def recurrent_only(self) -> bool:
        """Mamba-like (`compat.recurrent_only`): a forward takes its own positions' mask columns (a causal LM's)."""
        return compat.recurrent_only(self.model)

    def kv_costs(self, split_layer: int) -> tuple[int, int]:
        """What a sequence split at `split_layer` holds between steps, in bytes: per position, and per sequence
        whatever its length (a recurrent layer's state). In the store, what its pools hold a position in (the
        start-up check made a pool for every layer served); in a transformers cache, what one holds, measured once
        (`_measure_cache`), plus the config's bound for the placeholders of the layers below the split."""
        held = self.store.bytes_per_position(split_layer) if self.store is not None else None
        if held is not None:
            return held, 0
        if self.store is not None:
            layers = compat.decoder_layers(self.model)
            return compat.kv_bytes_per_position(self.model.config, split_layer, self.dtype, False, layers), 0
        if self._cache_costs is None:
            self._cache_costs = self._measure_cache()
        served = self._cache_costs[split_layer:]
        placeholders = split_layer * 2 * self.dtype.itemsize  # a [B, 1, T, 1] K and V (`compat.phantom_cache_update`)
        return sum(p for p, _ in served) + placeholders, sum(s for _, s in served)

    def chunks_match(self) -> bool:
        """Whether a transformers cache carries a prompt on from one forward to the next exactly (once: a prompt in one
        forward and in two, the first past the shortest sliding window). Mamba's mixers run a forward of several
        positions afresh from their cache, and Moshi's prefill attends to every earlier position, a forward after one
        only to its window: a step of theirs runs whole, and is sent whole; so does one of a window too long to test
        (over 255 positions)."""
        windows = [w for w in compat.sliding_windows(self.model) if w]
        if self.recurrent_only or windows and min(windows) > 255:
            return False
        length = 2 * min(windows) + 2 if windows else 8
        x, k = self._probe_rows(1, length), self.min_split_layer
        whole = self.run(k, "hidden", x, None, torch.arange(length)[None], compat.new_cache(self.model), length)
        cache, half = compat.new_cache(self.model), length // 2
        parts = [
            self.run(k, "hidden", x[:, a:b], None, torch.arange(a, b)[None], cache, b - a)
            for a, b in ((0, half), (half, length))
        ]
        return self._close(torch.cat(parts, 1), whole)

    def _measure_cache(self) -> list[tuple[int, int]]:
        """Per decoder layer, the bytes a transformers cache of one sequence holds per position and per sequence
        (an attention layer's keys and values grow with it, a recurrent layer's state does not): read from a cache
        after one position and after two, the layers from the shallowest split on run."""
        cache, x, held = compat.new_cache(self.model), self._probe_rows(1, 2), []
        for t in range(2):
            self.run(self.min_split_layer, "hidden", x[:, t : t + 1], None, torch.tensor([[t]]), cache, 1)
            held.append(compat.cache_layer_bytes(cache))
        return [(two - one, max(2 * one - two, 0)) for one, two in zip(*held)]

    @torch.inference_mode()
    def store_forward(
        self,
        rows: list[Row],
        hidden: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Layers from each row's split on, for `hidden` [R, t, d] (rows sorted by split layer), K/V in the store.
        Returns the last layer's output [R, t, d], or with `logits_to_keep` the last positions' float32 logits."""
        if not compat.routes_attention(self.model):  # its owner set another attention (an in-process server's)
            implementation = self.model.config._attn_implementation
            if not compat.route_attention(self.model, store_attention):
                raise ConfigError(
                    f"the model's attention was set to {implementation!r} after its server started; the server's "
                    "KV store runs SDPA attention: set it back to 'sdpa'"
                )
        batch = StoreBatch(self.store, rows, hidden.shape[1], valid)
        plan = SplitPlan("server", rows[0].split_layer, inject=hidden, store=batch, rows_at=batch.rows_at)
        mask = compat.forward_mask_placeholder(self.device)
        final = self._suffix(plan, mask, positions, batch, logits_to_keep)
        batch.commit()
        return final

    @torch.inference_mode()
    def run(
        self,
        split_layer: int,
        downlink: str,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Any,
        keep: int,
    ) -> torch.Tensor:
        """Layers `split_layer..L-1` on `hidden` [B, T, d]; returns the last `keep` positions' final hidden states
        (downlink 'hidden') or float32 logits."""
        plan = SplitPlan("server", split_layer, inject=hidden)
        if mask is not None and self.recurrent_only:
            mask = mask[:, -hidden.shape[1] :]
        mask = mask.to(self.device) if mask is not None else None
        if downlink == "hidden":
            return self._suffix(plan, mask, positions, cache, None)[:, hidden.shape[1] - keep :]
        return self._suffix(plan, mask, positions, cache, keep)

    def _suffix(
        self,
        plan: SplitPlan,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Any,
        logits_to_keep: int | None,
    ) -> torch.Tensor:
        """One forward of the model under `plan` (its `inject` is the input): the last layer's output [B, T, d], or
        with `logits_to_keep` the last positions' float32 logits."""
        hidden = plan.inject
        kwargs = {
            "inputs_embeds": compat.stand_in_embeds(self.model, hidden),
            "attention_mask": mask,
            "position_ids": positions.to(self.device),
            compat.cache_kwarg(self.model): cache,
            "use_cache": True,
        }
        with split_plan(plan):
            if not logits_to_keep:  # no logits wanted (an early prefill chunk): the cache still takes the positions
                compat.base_model(self.model)(**kwargs)
                if logits_to_keep is None:
                    return plan.final
                return torch.zeros(len(hidden), 0, self.model.config.vocab_size, device=hidden.device)
            whole = getattr(type(self.model), "_slicer_base", type(self.model)).forward  # not the split forward
            return whole(self.model, **kwargs, logits_to_keep=logits_to_keep).logits[:, -logits_to_keep:].float()

    def _store_matches_cache(self, min_split_layer: int) -> bool:
        """Check, once, that the KV store reproduces the model's own cache on this architecture: two sequences
        at the shallowest and deepest split, prefilled to different lengths (past the shortest sliding window, up
        to 512 positions: every prefill output is compared), then one decode step together."""
        splits = sorted({min_split_layer, compat.num_layers(self.model.config) - 1})
        windows = [w for w in self.store.sliding_windows if w]
        length = min(min(windows) + 2, 512) if windows else 3  # past a sliding window, if one is short enough
        x = self._probe_rows(len(splits), length + 1)
        self.store.asked_windows = {}  # recorded by the check's forwards only
        try:
            rows = [self.store.new_row(k) for k in splits]
            prefilled = []
            for i, row in enumerate(rows):  # prefill `length` and `length - 1` positions
                n = length - i
                prefilled.append(self.store_forward([row], x[i : i + 1, :n], torch.arange(n).unsqueeze(0)))
            lengths = torch.tensor([[row.length] for row in rows])
            got = self.store_forward(
                rows, torch.stack([x[i, row.length] for i, row in enumerate(rows)])[:, None], lengths
            )
            # a cache's window that the attention does not name (llama4's chunks, moshi's causal mask over a sliding
            # cache, or phimoe's windowed mask: no telling which) differs only past the window: beyond this test
            asked_windows, self.store.asked_windows = self.store.asked_windows, None
            for layer, asked in sorted(asked_windows.items()):
                window = self.store.sliding_windows[layer]
                if asked != window and max(asked or 0, window or 0) > length - 2:
                    raise ValueError(
                        f"layer {layer}'s attention names window {asked}, its transformers cache keeps {window}, and "
                        f"this check cannot run past it"
                    )
            for i, (k, row) in enumerate(zip(splits, rows)):
                cache, n = compat.new_cache(self.model), row.length - 1
                before = self.run(k, "hidden", x[i : i + 1, :n], None, torch.arange(n)[None], cache, n)
                want = self.run(k, "hidden", x[i : i + 1, n : n + 1], None, torch.tensor([[n]]), cache, 1)
                # a prefill past the window (moshi's: its cache's own prefill attends to every position before it)
                for what, mine, theirs in (("prefill", prefilled[i], before), ("decode", got[i : i + 1], want)):
                    if not self._close(mine, theirs):
                        error = (mine - theirs).abs().max().item()
                        raise ValueError(f"store {what} output differs from the transformers cache by {error:.3g}")
                self.store.release(row)
        except Exception as exc:
            logger.warning("KV store off for %s (%s); sessions keep their own caches", type(self.model).__name__, exc)
            return False
        return True

    def _probe_rows(self, rows: int, length: int) -> torch.Tensor:
        """Seeded random hidden states `[rows, length, d]` for the start-up checks, where the model computes."""
        d = int(self.model.config.hidden_size)
        return torch.randn(rows, length, d, generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)

    def _close(self, mine: torch.Tensor, theirs: torch.Tensor) -> bool:
        """Whether two outputs of the same forward agree within the float noise of the model's dtype."""
        tolerance = 1e-4 if self.dtype == torch.float32 else 3e-2
        return (mine - theirs).abs().max().item() <= tolerance * (1 + theirs.abs().max().item())
