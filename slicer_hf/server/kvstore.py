"""The server's KV store: per-layer pools of K/V blocks, and a block table for every sequence row.

Sessions hold no cache object. Each of their rows (one per sequence) owns block ids, in every layer it runs, into
pools shared by all sessions; a row that leaves gives its blocks back. A forward over any set of rows builds a
`StoreBatch`, which stands where transformers' cache would: the model's own attention modules compute K/V as
usual and hand them to `StoreBatch.update`, which writes them into the rows' blocks and returns every row's keys
and values up to the batch's longest row. `store_attention` (registered with transformers' attention interface)
then runs one SDPA call per layer for all rows, masked by each row's length, padding and sliding window.

Pools are created on a layer's first write (their shape is the layer's K/V shape, whatever the family) and grow by
half when their blocks run out, before any row is given the new blocks (a growth that fails fails the step that
asked for it, and nothing else). Nothing is copied or merged per step: a step writes its new positions and reads
each row's positions once (the read is one gather per layer; a paged-attention kernel could read blocks in place).

Each layer hands out its own block ids, so a pool holds only the rows that run its layer, and a layer's pool keeps
its size when its rows leave. With `max_bytes`, the pools together never hold more than that (plus their zero
blocks): a growth that would pass it first compacts every layer (moves the blocks in use to the lowest ids and cuts
the pools to them) and grows to fit what is asked, with what room is left as slack. An idle server trims them the
same way (`trim`), so that what a burst left goes back.

What a row reads past its own length is masked, but masking does not stop a NaN (0 x NaN is NaN), so a row never
reads another row's data: block 0 of every pool is never handed out and stays zero (a row's table points there
past its own blocks), and a block given back is zeroed before another row gets it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import compat, hooks
from ..errors import ProtocolError

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
        max_bytes: the most the pools may hold, zero blocks aside (None: no bound); the server's KV budget, which
            admission keeps the rows' blocks within.
    """

    def __init__(
        self,
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
        sliding_windows: list[int | None] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.num_layers, self.device, self.dtype, self.block_size = num_layers, device, dtype, block_size
        self.max_bytes = max_bytes
        self.sliding_windows = sliding_windows or [None] * num_layers  # per layer (None: full attention)
        self.asked_windows: dict[int, int | None] | None = None  # while recorded: the window each layer asks for
        self.pools: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "k"|"v") -> [heads, blocks * block_size, dim]
        self._free: list[list[int]] = [[] for _ in range(num_layers)]
        self._next: list[int] = [NULL_BLOCK + 1] * num_layers  # the next fresh block id, per layer
        self._holders: set[Row] = set()  # rows holding blocks (what a compaction moves)

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.block_size)

    # ---------------------------------------------------------------- rows
    def new_row(self, split_layer: int) -> Row:
        return Row(split_layer, blocks=torch.zeros(self.num_layers, 4, dtype=torch.long))

    def reserve(self, row: Row, length: int) -> None:
        """Give `row` blocks for `length` positions in every layer it runs. The pools grow first: if that fails
        (out of memory, or past `max_bytes`), the row is left as it was."""
        needed = self.blocks_for(length)
        if needed <= row.num_blocks:
            return
        count = needed - row.num_blocks
        layers = range(row.split_layer, self.num_layers)
        self._make_room(dict.fromkeys(layers, count))
        if needed > row.blocks.shape[1]:
            grown = torch.zeros(self.num_layers, max(needed, 2 * row.blocks.shape[1]), dtype=torch.long)
            grown[:, : row.num_blocks] = row.blocks[:, : row.num_blocks]
            row.blocks = grown
        reused: dict[int, list[int]] = {}
        try:
            for layer in layers:
                free = self._free[layer]
                reused[layer] = [free.pop() for _ in range(min(count, len(free)))]
                if reused[layer]:  # another row's data: zeroed before this row may read it
                    self._zero(layer, reused[layer])
        except BaseException:  # the blocks taken go back: no id is ever neither held nor free
            for layer, ids in reused.items():
                self._free[layer].extend(ids)
            raise
        for layer in layers:  # then fresh ids, within the pools `_make_room` grew: nothing here can fail
            fresh = count - len(reused[layer])
            ids = reused[layer] + list(range(self._next[layer], self._next[layer] + fresh))
            self._next[layer] += fresh
            row.blocks[layer, row.num_blocks : needed] = torch.tensor(ids)
        row.num_blocks = needed
        self._holders.add(row)

    def slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """The pool positions `[..., n * block_size]` of block ids `[..., n]`, in order."""
        offsets = torch.arange(self.block_size, device=blocks.device)
        return (blocks.unsqueeze(-1) * self.block_size + offsets).flatten(-2)

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
        if keep == 0:
            self._holders.discard(row)

    # ---------------------------------------------------------------- pools
    def pool(self, layer: int, which: str, like: torch.Tensor) -> torch.Tensor:
        """The pool of `layer`, created on the layer's first write from the shape of `like` [B, heads, T, dim] and
        holding every block id handed out so far."""
        pool = self.pools.get((layer, which))
        if pool is None:
            pool = torch.zeros(like.shape[1], 0, like.shape[-1], dtype=self.dtype, device=self.device)
        if pool.shape[1] < self._next[layer] * self.block_size:
            pool = self.pools[(layer, which)] = self._resize(layer, which, self._next[layer], pool)
        return pool

    def _make_room(self, count: dict[int, int]) -> None:
        """Grow the pools of the layers in `count` so that each can hand out that many more blocks."""
        want = self._blocks_wanted(count)
        if self.max_bytes is not None and self._bytes_with(want) > self.max_bytes:
            for layer in range(self.num_layers):  # the pools may hold free blocks of rows gone: reclaim them
                self._compact(layer)
            want = self._blocks_wanted(count)
            if self._bytes_with(want) > self.max_bytes:  # admission keeps rows within the budget: not reached
                raise ProtocolError(
                    f"KV store full: {self._bytes_with(want):,} bytes needed, {self.max_bytes:,} allowed",
                    code="kv_budget",
                )
        # slack: a pool grows by half, within an even share of what the bound leaves (all of it to the first layers
        # grown left the others none, and their next growth compacted every layer again)
        share = None if self.max_bytes is None else (self.max_bytes - self._bytes_with(want)) // max(len(want), 1)
        for layer, blocks in want.items():
            size = max(blocks, self._capacity(layer) * 3 // 2)
            if share is not None:
                size = min(size, blocks + share // self._block_bytes(layer))
            self._install(layer, size)

    def _blocks_wanted(self, count: dict[int, int]) -> dict[int, int]:
        """The pool sizes (in blocks) that `count` more blocks per layer need, where they pass a pool's size (layers
        without a pool yet are left to their first write)."""
        want = {}
        for layer, n in count.items():
            blocks = self._next[layer] + max(0, n - len(self._free[layer]))
            if (layer, "k") in self.pools and blocks > self._capacity(layer):
                want[layer] = blocks
        return want

    def _capacity(self, layer: int) -> int:
        """Blocks the layer's pools hold (the smaller's, should one have been created and not the other)."""
        return min(pool.shape[1] for pool in self._layer_pools(layer)) // self.block_size

    def _install(self, layer: int, blocks: int) -> None:
        """Resize the layer's K and V pools to `blocks` blocks together: both are made before either replaces its
        pool, so a failure (out of memory) leaves both as they were, never of two sizes."""
        resized = {key: self._resize(layer, key[1], blocks, self.pools[key]) for key in self._pool_keys(layer)}
        self.pools.update(resized)

    def _pool_keys(self, layer: int) -> list[tuple[int, str]]:
        return [(layer, which) for which in ("k", "v") if (layer, which) in self.pools]

    def _block_bytes(self, layer: int) -> int:
        return sum(p.shape[0] * p.shape[2] * p.element_size() for p in self._layer_pools(layer)) * self.block_size

    def _layer_pools(self, layer: int) -> list[torch.Tensor]:
        return [self.pools[key] for key in self._pool_keys(layer)]

    def _bytes_with(self, want: dict[int, int]) -> int:
        """Bytes of the pools, with those of `want` at its sizes, less each pool's zero block."""
        total = 0
        for layer in {layer for layer, _ in self.pools}:
            total += (want.get(layer, self._capacity(layer)) - 1) * self._block_bytes(layer)
        return total

    def _resize(self, layer: int, which: str, blocks: int, pool: torch.Tensor) -> torch.Tensor:
        """A copy of `layer`'s pool `which` holding `blocks` blocks, with what fits of `pool` (new positions are zero);
        the caller installs it."""
        size = blocks * self.block_size
        if size <= pool.shape[1]:
            return pool[:, :size].clone()
        resized = torch.zeros(pool.shape[0], size, pool.shape[2], dtype=pool.dtype, device=pool.device)
        resized[:, : pool.shape[1]] = pool
        return resized

    def _compact(self, layer: int) -> None:
        """Move the blocks in use in `layer` to the lowest ids, and cut its pools to them. The moves and the
        bookkeeping come first and allocate only the moving blocks' data; a cut that then fails (out of memory)
        leaves the pools whole, with the ids above the blocks in use on the free list (zeroed before reuse): never a
        row on a block another row may be given."""
        held = [(row, i) for row in self._holders if row.split_layer <= layer for i in range(row.num_blocks)]
        top = NULL_BLOCK + 1 + len(held)  # ids below `top` are enough for every block in use
        holes = iter(sorted(b for b in self._free[layer] if b < top))
        moves = [(row, i, next(holes)) for row, i in held if row.blocks[layer, i] >= top]
        if moves:
            old = self.slots(torch.stack([row.blocks[layer, i] for row, i, _ in moves]))
            new = self.slots(torch.tensor([hole for _, _, hole in moves]))
            moving = [pool.index_select(1, old.to(pool.device)) for pool in self._layer_pools(layer)]
            for pool, data in zip(self._layer_pools(layer), moving):  # into free blocks, in place
                pool.index_copy_(1, new.to(pool.device), data)
            for row, i, hole in moves:
                row.blocks[layer, i] = hole
        above, self._next[layer], self._free[layer] = self._next[layer], top, []  # every id below `top` is in use
        try:
            if any(pool.shape[1] > top * self.block_size for pool in self._layer_pools(layer)):  # free blocks, slack
                self._install(layer, top)
        except BaseException:  # not cut: the ids from `top` on hold moved rows' data, and go back as free blocks
            self._next[layer], self._free[layer] = above, list(range(top, above))
            raise

    def bytes_per_position(self, split_layer: int) -> int | None:
        """What one position of a row split at `split_layer` takes in the pools of the layers it runs, as the pools
        hold it (their K/V shapes are what the model's attention writes: a compressed latent, say, where the config
        names more heads); None while one of those layers has no pool yet."""
        layers = range(split_layer, self.num_layers)
        if not all(self._pool_keys(layer) for layer in layers):
            return None
        return sum(self._block_bytes(layer) for layer in layers) // self.block_size

    def bytes_allocated(self) -> int:
        """Bytes of all pools (read from other threads while the scheduler may add one: iterate a snapshot)."""
        return sum(p.numel() * p.element_size() for p in list(self.pools.values()))

    def blocks_in_use(self) -> int:
        return sum(self._in_use(layer) for layer in range(self.num_layers))

    def _in_use(self, layer: int) -> int:
        """Blocks of `layer` that rows hold (the ids handed out, less those given back)."""
        return self._next[layer] - (NULL_BLOCK + 1) - len(self._free[layer])

    @torch.inference_mode()  # the pools were made under it, by the forwards
    def trim(self) -> int:
        """Give back what a burst left: compact every layer whose pools hold more than twice the blocks its rows use
        (plus one), cutting them to those blocks. Returns the bytes freed. Only between forwards (the compute
        thread, idle)."""
        before = self.bytes_allocated()
        for layer in range(self.num_layers):
            if self._pool_keys(layer) and self._capacity(layer) > 2 * (self._in_use(layer) + 1):
                self._compact(layer)
        return before - self.bytes_allocated()


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
        query_pos = starts.unsqueeze(1) + torch.arange(tokens)  # [R, t] cache index of each new position
        # the block tables go to the device as they are; `update` expands a layer's into the positions it reads (a
        # table of every layer's, [R, layers, longest], cost more than the forward at long contexts)
        self.blocks = blocks.to(device)
        at = (query_pos // store.block_size).unsqueeze(1).expand(-1, store.num_layers, -1)
        self.write = (blocks.gather(2, at) * store.block_size + (query_pos % store.block_size).unsqueeze(1)).to(device)
        key_pos = torch.arange(self.longest)
        allowed = key_pos <= query_pos.unsqueeze(-1)  # [R, t, longest]: causal
        if valid is not None:
            allowed &= valid[:, : self.longest].unsqueeze(1)
        self._query_pos, self._key_pos = query_pos.to(device), key_pos.to(device)
        self._masks: dict[int | None, torch.Tensor] = {None: self._own(allowed.to(device))}
        self._split_layers = [row.split_layer for row in rows]

    def _own(self, allowed: torch.Tensor) -> torch.Tensor:
        """A padding position that may see no key gets SDPA's zeros, as in transformers, where this torch's SDPA
        answers so; on older torch (NaN) it sees itself: its output is unused, but must not be NaN."""
        if not sdpa_zeroes_unattended(torch.device(self.store.device), self.store.dtype):
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
        read = self.store.slots(self.blocks[:n, layer_idx])[:, : self.longest].reshape(-1)  # [n * longest]
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


@functools.cache
def sdpa_zeroes_unattended(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's SDPA on `device` gives zeros (2.5 on), not NaN, for a query whose mask allows no key."""
    kv = torch.ones(1, 1, 8, 64, device=device, dtype=dtype)
    nothing = torch.zeros(1, 1, 1, 8, dtype=torch.bool, device=device)
    return bool((F.scaled_dot_product_attention(kv[:, :, :1], kv, kv, attn_mask=nothing) == 0).all())


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
    window = kwargs.get("sliding_window") or None
    if batch.store.asked_windows is not None:  # the start-up check compares it with the cache's
        batch.store.asked_windows[module.layer_idx] = window
    window = window or batch.store.sliding_windows[module.layer_idx]
    mask = batch.mask(n, window)  # [n, 1, t, longest]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = torch.tanh(query @ key.transpose(-1, -2) * (scaling or dim**-0.5) / softcap) * softcap
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
        weights = torch.where(mask.any(-1, keepdim=True), weights, 0)  # a query seeing no key: zeros, as SDPA's
        return (weights @ value).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None
