"""The server's KV store: per-layer pools of K/V blocks, and a block table for every sequence row.

Sessions hold no cache object. Each of their rows (one per sequence) owns block ids, in every layer it runs, into
pools shared by all sessions; a row that leaves gives its blocks back. A forward over any set of rows builds a
`StoreBatch`, which stands where transformers' cache would: the model's own attention modules compute K/V as
usual and hand them to `StoreBatch.update`, which writes them into the rows' blocks and returns every row's keys
and values up to the batch's longest row. `store_attention` (registered with transformers' attention interface)
then runs one SDPA call per layer for all rows, masked by each row's length, padding and sliding window.

Pools are created on a layer's first write (their shape is the layer's K/V shape, whatever the family) and grow by
half when their blocks run out. Nothing is copied or merged per step: a step writes its new positions and reads
each row's positions once (the read is one gather per layer; a paged-attention kernel could read blocks in place).

What a row reads past its own length is masked, but masking does not stop a NaN (0 x NaN is NaN), so a row never
reads another row's data: block 0 of every pool is never handed out and stays zero (a row's table points there
past its own blocks), and a block given back is zeroed before another row gets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import compat, hooks

BLOCK_SIZE = 16
NULL_BLOCK = 0  # in every pool, never written: what a row's table points at past its own blocks


@dataclass(eq=False)
class Row:
    """One sequence's place in the store: its length and, per layer it runs, its block ids."""

    split_layer: int
    length: int = 0  # positions written and kept
    blocks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))  # [layers, capacity]
    num_blocks: int = 0  # used columns of `blocks`


class KVStore:
    """Block pools for layers `first_layer..num_layers-1`, shared by every row.

    Args:
        num_layers: decoder layers of the model.
        device: where the pools live.
        dtype: the K/V dtype (the model's).
        block_size: positions per block.
        sliding_windows: per layer, the window of a sliding-window attention layer (`compat.sliding_windows`).
    """

    def __init__(
        self,
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
        sliding_windows: list[int | None] | None = None,
    ) -> None:
        self.num_layers, self.device, self.dtype, self.block_size = num_layers, device, dtype, block_size
        self.sliding_windows = sliding_windows or [None] * num_layers  # per layer (None: full attention)
        self.pools: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "k"|"v") -> [heads, blocks * block_size, dim]
        self._free: list[list[int]] = [[] for _ in range(num_layers)]
        self._next: list[int] = [NULL_BLOCK + 1] * num_layers  # the next fresh block id, per layer

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.block_size)

    # ---------------------------------------------------------------- rows
    def new_row(self, split_layer: int) -> Row:
        return Row(split_layer, blocks=torch.zeros(self.num_layers, 4, dtype=torch.long))

    def reserve(self, row: Row, length: int) -> None:
        """Give `row` blocks for `length` positions in every layer it runs."""
        needed = self.blocks_for(length)
        if needed <= row.num_blocks:
            return
        if needed > row.blocks.shape[1]:
            grown = torch.zeros(self.num_layers, max(needed, 2 * row.blocks.shape[1]), dtype=torch.long)
            grown[:, : row.num_blocks] = row.blocks[:, : row.num_blocks]
            row.blocks = grown
        count = needed - row.num_blocks
        for layer in range(row.split_layer, self.num_layers):
            free = self._free[layer]
            ids = [free.pop() for _ in range(min(count, len(free)))]
            if ids:  # another row's data: zeroed before this row may read it
                self._zero(layer, ids)
            fresh = count - len(ids)
            ids.extend(range(self._next[layer], self._next[layer] + fresh))
            self._next[layer] += fresh
            row.blocks[layer, row.num_blocks : needed] = torch.tensor(ids)
        row.num_blocks = needed

    def slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """The pool positions `[..., n * block_size]` of block ids `[..., n]`, in order."""
        return (blocks.unsqueeze(-1) * self.block_size + torch.arange(self.block_size)).flatten(-2)

    def _zero(self, layer: int, ids: list[int]) -> None:
        slots = self.slots(torch.tensor(ids))
        for which in ("k", "v"):
            pool = self.pools.get((layer, which))
            if pool is not None:
                pool.index_fill_(1, slots.to(pool.device), 0)

    def truncate(self, row: Row, length: int) -> None:
        """Keep the first `length` positions of `row` and give back the blocks beyond them."""
        self._give_back(row, self.blocks_for(length))
        row.length = min(row.length, length)

    def release(self, row: Row) -> None:
        self._give_back(row, 0)
        row.length = 0

    def _give_back(self, row: Row, keep: int) -> None:
        if keep >= row.num_blocks:
            return
        for layer in range(row.split_layer, self.num_layers):
            self._free[layer].extend(row.blocks[layer, keep : row.num_blocks].tolist())
        row.num_blocks = keep

    # ---------------------------------------------------------------- pools
    def pool(self, layer: int, which: str, like: torch.Tensor) -> torch.Tensor:
        """The pool of `layer` (created from the shape of `like` [B, heads, T, dim]), grown to every block id
        handed out so far."""
        needed = self._next[layer] * self.block_size
        pool = self.pools.get((layer, which))
        if pool is None or pool.shape[1] < needed:
            heads, dim = like.shape[1], like.shape[-1]
            size = max(needed, (pool.shape[1] * 3 // 2) if pool is not None else 0)
            grown = torch.zeros(heads, size, dim, dtype=self.dtype, device=self.device)
            if pool is not None:
                grown[:, : pool.shape[1]] = pool
            self.pools[(layer, which)] = pool = grown
        return pool

    def bytes_allocated(self) -> int:
        """Bytes of all pools (read from other threads while the scheduler may add one: iterate a snapshot)."""
        return sum(p.numel() * p.element_size() for p in list(self.pools.values()))

    def blocks_in_use(self) -> int:
        return sum(n - (NULL_BLOCK + 1) - len(free) for n, free in zip(self._next, self._free))


class StoreBatch:
    """One forward over `rows` (sorted by split layer), each adding `tokens` positions after its current length.

    Passed to the model as its cache; `rows_at(layer)` tells the hooks how many leading rows run a layer.

    Args:
        store: the KV store.
        rows: the rows, in batch order, sorted by `split_layer`.
        tokens: new positions per row.
        valid: [R, longest] key positions that are not padding (None: all are).
    """

    def __init__(self, store: KVStore, rows: list[Row], tokens: int, valid: torch.Tensor | None = None) -> None:
        assert all(a.split_layer <= b.split_layer for a, b in zip(rows, rows[1:])), "rows must be sorted by split"
        self.store, self.rows, self.tokens = store, rows, tokens
        device = store.device
        starts = torch.tensor([row.length for row in rows])
        self.longest = int(starts.max()) + tokens
        for row in rows:
            store.reserve(row, row.length + tokens)
        width = store.blocks_for(self.longest)
        blocks = torch.full((len(rows), store.num_layers, width), NULL_BLOCK, dtype=torch.long)  # [R, layers, width]
        for i, row in enumerate(rows):
            blocks[i, :, : row.num_blocks] = row.blocks[:, : row.num_blocks]
        slots = store.slots(blocks)[:, :, : self.longest]  # [R, layers, longest]
        query_pos = starts.unsqueeze(1) + torch.arange(tokens)  # [R, t] cache index of each new position
        self.read = slots.to(device)
        self.write = slots.gather(2, query_pos.unsqueeze(1).expand(-1, slots.shape[1], -1)).to(device)  # [R, layers, t]
        key_pos = torch.arange(self.longest)
        allowed = key_pos <= query_pos.unsqueeze(-1)  # [R, t, longest]: causal
        if valid is not None:
            allowed &= valid[:, : self.longest].unsqueeze(1)
        self._query_pos, self._key_pos = query_pos.to(device), key_pos.to(device)
        self._masks: dict[int | None, torch.Tensor] = {None: self._own(allowed.to(device))}
        self._split_layers = [row.split_layer for row in rows]

    def _own(self, allowed: torch.Tensor) -> torch.Tensor:
        """Every position sees at least itself (a padding position's output is unused, but must not be NaN)."""
        allowed = allowed | (self._key_pos == self._query_pos.unsqueeze(-1))
        return allowed.unsqueeze(1)  # [R, 1, t, longest]

    def rows_at(self, layer: int) -> int:
        """How many leading rows run `layer` (those split at or below it)."""
        return sum(1 for k in self._split_layers if k <= layer)

    def mask(self, rows: int, sliding_window: int | None) -> torch.Tensor:
        """[rows, 1, t, longest] True where attention is allowed."""
        if sliding_window not in self._masks:
            recent = self._key_pos > self._query_pos.unsqueeze(-1) - sliding_window
            self._masks[sliding_window] = self._masks[None] & self._own(recent)
        return self._masks[sliding_window][:rows]

    def commit(self) -> None:
        """The forward succeeded: the rows now hold their new positions."""
        for row in self.rows:
            row.length += self.tokens

    # ---------------------------------------------------------------- the cache interface transformers calls
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        """Write the new K/V [n, heads, t, dim] of the first n rows; return their K/V up to the longest row."""
        n = key.shape[0]
        write = self.write[:n, layer_idx].reshape(-1)  # [n * t]
        read = self.read[:n, layer_idx].reshape(-1)  # [n * longest]
        out = []
        for which, new in (("k", key), ("v", value)):
            pool = self.store.pool(layer_idx, which, new)
            heads, dim = new.shape[1], new.shape[-1]
            pool.index_copy_(1, write, new.transpose(0, 1).reshape(heads, -1, dim).to(pool.dtype))
            # index_select, not pool[:, read]: the same gather, several times faster on the CPU
            out.append(pool.index_select(1, read).view(heads, n, self.longest, dim).transpose(0, 1))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.longest - self.tokens


def store_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the store for the active `StoreBatch`; otherwise the model's own SDPA attention.

    query [n, heads, t, dim], key/value [n, kv_heads, longest, dim]; returns [n, t, heads, dim].
    """
    plan = hooks.active_plan()
    batch = plan.store if plan is not None else None
    if batch is None:
        return compat.sdpa_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks are not supported by the KV store")
    if not compat.is_mask_placeholder(attention_mask):
        raise NotImplementedError("the layer computes an attention mask of its own; the KV store builds its masks")
    n, heads, t, dim = query.shape
    groups = heads // key.shape[1]
    window = kwargs.get("sliding_window") or batch.store.sliding_windows[module.layer_idx]
    mask = batch.mask(n, window)  # [n, 1, t, longest]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = torch.tanh(query @ key.transpose(-1, -2) * (scaling or dim**-0.5) / softcap) * softcap
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
        return (weights @ value).transpose(1, 2).contiguous(), None
    if t == 1 and groups > 1:  # the heads of a group become its query positions: no K/V repeat
        out = F.scaled_dot_product_attention(
            query.reshape(n, heads // groups, groups, dim), key, value, attn_mask=mask, scale=scaling
        )
        return out.reshape(n, heads, 1, dim).transpose(1, 2), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None
