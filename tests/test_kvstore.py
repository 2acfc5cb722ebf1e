"""The server engine's KV store and scheduler: blocks come and go, many sessions at mixed split layers batch
together and each still generates exactly what plain transformers `generate()` does, long prefills are chunked
between decode rounds."""

from __future__ import annotations

import copy
import gc
import random
import threading
import time
import weakref

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model

from slicer_hf import SlicerConfig, SlicerModelForCausalLM, build_codec, compat, protocol
from slicer_hf.errors import ProtocolError
from slicer_hf.link import open_request
from slicer_hf.server import ServerLimits, SplitServer
from slicer_hf.server.kvstore import KVStore
from slicer_hf.transport import LocalTransport


def run_together(*fns, timeout_s: float = 120) -> None:
    """Run the functions in threads at once and wait for all."""
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)


def split_client(ref: torch.nn.Module, server: SplitServer, split_layer: int) -> SlicerModelForCausalLM:
    """A lossless split copy of `ref` whose server part is `server`."""
    config = SlicerConfig(codec="identity", split_layer=split_layer)
    return SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, transport=LocalTransport(server))


def test_rows_take_blocks_per_layer_they_run_and_give_them_back():
    store = KVStore(num_layers=6, device=torch.device("cpu"), dtype=torch.float32, block_size=4)
    deep, shallow = store.new_row(split_layer=4), store.new_row(split_layer=1)
    store.reserve(deep, 9)  # 3 blocks in layers 4 and 5
    store.reserve(shallow, 4)  # 1 block in layers 1..5
    assert deep.num_blocks == 3 and shallow.num_blocks == 1
    assert store.blocks_in_use() == 3 * 2 + 1 * 5
    store.truncate(deep, 5)  # keeps 2 blocks
    assert deep.num_blocks == 2 and store.blocks_in_use() == 2 * 2 + 5
    store.release(shallow)
    store.release(deep)
    assert store.blocks_in_use() == 0
    again = store.new_row(split_layer=4)
    store.reserve(again, 12)
    assert set(again.blocks[4, :3].tolist()) < {1, 2, 3, 4}  # freed ids are reused: the pools need not grow
    assert 0 not in again.blocks[4, :3].tolist()  # block 0 is never handed out: rows read it past their own


def test_a_block_given_back_is_zeroed_before_another_row_gets_it():
    store = KVStore(num_layers=1, device=torch.device("cpu"), dtype=torch.float32, block_size=2)
    first = store.new_row(split_layer=0)
    store.reserve(first, 2)
    block = int(first.blocks[0, 0])
    store.pool(0, "k", torch.zeros(1, 3, 1, 5))[:, 2 * block : 2 * block + 2] = float("nan")
    store.release(first)
    second = store.new_row(split_layer=0)
    store.reserve(second, 2)
    assert second.blocks[0, 0] == first.blocks[0, 0]  # the same block, reused
    assert bool((store.pools[0, "k"] == 0).all())


def test_pools_grow_when_blocks_run_out_and_keep_what_they_held():
    store = KVStore(num_layers=2, device=torch.device("cpu"), dtype=torch.float32, block_size=2)
    row = store.new_row(split_layer=0)
    store.reserve(row, 2)
    pool = store.pool(0, "k", torch.zeros(1, 3, 1, 5))
    held = slice(2 * int(row.blocks[0, 0]), 2 * int(row.blocks[0, 0]) + 2)
    pool[:, held] = 7.0
    store.reserve(store.new_row(split_layer=0), 40)
    grown = store.pool(0, "k", torch.zeros(1, 3, 1, 5))
    assert grown.shape == (3, 2 * (1 + 1 + 20), 5)  # the null block, the first row's, the second row's 20
    assert bool((grown[:, held] == 7.0).all())


def test_a_compaction_moves_the_blocks_in_use_to_the_lowest_ids_and_keeps_every_rows_data():
    block = 2 * 2 * 3 * 4  # bytes of one block in one layer: K and V, 2 positions, 1 head of size 3, float32
    store = KVStore(num_layers=3, device=torch.device("cpu"), dtype=torch.float32, block_size=2, max_bytes=40 * block)
    rows = [store.new_row(split_layer=i % 3) for i in range(6)]
    for row in rows:
        store.reserve(row, 6)  # 3 blocks in each layer it runs
    for layer in range(3):
        for which in ("k", "v"):
            store.pool(layer, which, torch.zeros(1, 1, 1, 3))
    for n, row in enumerate(rows):  # every row's positions hold its number
        for layer in range(row.split_layer, 3):
            slots = store.slots(row.blocks[layer, : row.num_blocks])
            for which in ("k", "v"):
                store.pools[layer, which][:, slots] = float(n)
    for row in rows[:3]:  # the lowest ids fall free
        store.release(row)
    assert store.bytes_allocated() == (7 + 13 + 19) * block  # layers 0, 1, 2: 2, 4, 6 rows' blocks and block 0
    wide = store.new_row(split_layer=2)
    store.reserve(wide, 2 * 20)  # 20 more blocks in layer 2: past the bound, unless the free ones are reclaimed

    assert store.bytes_allocated() <= 40 * block + 3 * block  # the bound, plus each layer's zero block
    for n, row in enumerate(rows[3:], start=3):
        for layer in range(row.split_layer, 3):
            ids = row.blocks[layer, : row.num_blocks]
            assert int(ids.max()) <= 3 * (1 + (layer >= 1) + (layer == 2))  # the lowest ids now
            for which in ("k", "v"):
                assert bool((store.pools[layer, which][:, store.slots(ids)] == n).all())
    assert store.blocks_in_use() == 3 + 3 * 2 + 3 * 3 + 20


@pytest.mark.parametrize("seed", range(3))
def test_under_random_traffic_near_the_bound_every_row_keeps_its_own_data(seed):
    """Rows at random splits grow, shrink and leave while the pools sit at their bound: compactions move blocks,
    and every row still reads exactly what it wrote, in blocks no other row holds."""
    rng = random.Random(seed)
    block = 2 * 2 * 3 * 4  # K and V of one block in one layer
    store = KVStore(num_layers=4, device=torch.device("cpu"), dtype=torch.float32, block_size=2, max_bytes=60 * block)
    for layer in range(4):
        for which in ("k", "v"):
            store.pool(layer, which, torch.zeros(1, 1, 1, 3))
    rows: dict[int, object] = {}  # value written -> row
    for value in range(1, 300):
        if rows and rng.random() < 0.4:
            kept = rng.choice(list(rows))
            row = rows[kept]
            if rng.random() < 0.5:
                store.release(rows.pop(kept))
            else:
                store.truncate(row, rng.randrange(row.length + 1))
        in_use = sum(r.num_blocks * (4 - r.split_layer) for r in rows.values())
        row = store.new_row(split_layer=rng.randrange(4))
        length = 2 * rng.randrange(1, 6)
        if in_use + store.blocks_for(length) * (4 - row.split_layer) > 60:  # what admission would refuse
            continue
        store.reserve(row, length)
        row.length = length
        rows[value] = row
        for layer in range(row.split_layer, 4):
            for which in ("k", "v"):
                store.pools[layer, which][:, store.slots(row.blocks[layer, : row.num_blocks])] = float(value)
        assert store.bytes_allocated() <= 60 * block + 4 * block  # the bound, and a zero block per layer
        for layer in range(4):
            ids = [i for r in rows.values() if r.split_layer <= layer for i in r.blocks[layer, : r.num_blocks].tolist()]
            assert len(ids) == len(set(ids)) and 0 not in ids
        for held, r in rows.items():
            for layer in range(r.split_layer, 4):
                written = store.slots(r.blocks[layer, : store.blocks_for(r.length)])[: r.length]
                assert bool((store.pools[layer, "k"][:, written] == held).all())


def test_the_pools_never_hold_more_than_the_kv_budget_as_sessions_at_other_splits_come_and_go():
    """Each layer hands out its own blocks: a session at split 3 fills layer 3, one at split 1 layers 1 to 3. Without
    reclaiming what gone sessions left, their pools would hold 1 + 1/2 + 1/3 of the budget."""
    budget = 64 << 10
    limits = ServerLimits(kv_budget_bytes=budget, max_session_kv_bytes=budget, idle_timeout_s=float("inf"))
    server = SplitServer(tiny_model("llama"), limits=limits)
    layer_block = compat.kv_bytes_per_position(server.model.config, 3, server.dtype, False) * 16
    for split_layer in (3, 2, 1):
        session = _open(server, split_layer)
        positions = budget // (layer_block * (4 - split_layer)) * 16  # the whole budget, in whole blocks
        protocol.raise_if_error(_step(server, session, 0, 0, positions))
        assert server.store.bytes_allocated() <= budget + 3 * layer_block  # plus a zero block per layer
        server.close_session(session)
    server.shutdown()


def test_a_pool_growth_that_fails_fails_that_step_alone(monkeypatch):
    """An out-of-memory growth of the pools (simulated past 64 positions) refuses the step that asked for it; the
    sessions that need no more memory carry on, and the server still takes new ones."""
    server = SplitServer(tiny_model("llama"), batching=False, limits=ServerLimits(idle_timeout_s=float("inf")))
    plain = KVStore._resize

    def resize(self, layer, which, blocks, pool):
        if blocks * self.block_size > max(64, pool.shape[1]):
            raise RuntimeError("out of memory (simulated)")
        return plain(self, layer, which, blocks, pool)

    monkeypatch.setattr(KVStore, "_resize", resize)
    small = _open(server, 1)
    protocol.raise_if_error(_step(server, small, 0, 0, 3))
    with pytest.raises(ProtocolError, match="out of memory"):
        protocol.raise_if_error(_step(server, _open(server, 1), 0, 0, 200))
    protocol.raise_if_error(_step(server, small, 1, 3, 1))  # inside a block it holds
    protocol.raise_if_error(_step(server, _open(server, 1), 0, 0, 3))
    server.shutdown()


def test_a_growth_that_fails_on_the_value_pool_leaves_both_pools_as_they_were(monkeypatch):
    """K grew and V ran out of memory: the store had handed out ids the V pool did not hold, a later reserve raised
    IndexError half-way (its blocks neither held nor free) and compactions failed for good after."""
    store = KVStore(1, torch.device("cpu"), torch.float32, block_size=2)
    first = store.new_row(0)
    store.reserve(first, 2)
    for which in ("k", "v"):
        store.pool(0, which, torch.zeros(1, 1, 1, 3))
    plain, out_of_memory = KVStore._resize, [True]

    def resize(self, layer, which, blocks, pool):
        if which == "v" and out_of_memory[0] and blocks * self.block_size > pool.shape[1]:
            raise RuntimeError("out of memory (simulated, V pool only)")
        return plain(self, layer, which, blocks, pool)

    monkeypatch.setattr(KVStore, "_resize", resize)
    second = store.new_row(0)
    for _ in range(2):  # refused each time, the pools of one size
        with pytest.raises(RuntimeError, match="out of memory"):
            store.reserve(second, 8)
        assert store.pools[0, "k"].shape == store.pools[0, "v"].shape and second.num_blocks == 0
    out_of_memory[0] = False
    store.reserve(second, 8)
    store.release(first)
    third = store.new_row(0)
    store.reserve(third, 2)  # takes the block `first` gave back, zeroed
    assert store.blocks_in_use() == 5 and store.pools[0, "v"].shape[1] >= store._next[0] * 2
    store._compact(0)
    assert sorted(second.blocks[0, :4].tolist() + third.blocks[0, :1].tolist()) == [1, 2, 3, 4, 5]


def test_near_the_budget_a_growth_shares_the_room_left_and_does_not_compact_every_layer_each_time():
    """All the room a growth left went to the first layers it grew, none to the others, whose next growth compacted
    every layer again (a Python walk over every block, on the compute thread): 32 rows decoding on 24 layers with a
    budget 5% over what they end up holding compacted at 656 of 800 growths."""
    layers, block, start, end = 24, 4, 40, 120
    store = KVStore(layers, torch.device("cpu"), torch.float32, block_size=block)
    for layer in range(layers):
        for which in ("k", "v"):
            store.pool(layer, which, torch.zeros(1, 1, 1, 1))
    rows = [store.new_row(0) for _ in range(8)]
    store.max_bytes = int(1.05 * len(rows) * (end // block) * layers * store._block_bytes(0))
    for row in rows:
        store.reserve(row, start)
    compactions = []
    plain = store._compact
    store._compact = lambda layer: compactions.append(layer) or plain(layer)
    for length in range(start + 1, end + 1):  # one position a row at a time, round robin
        for row in rows:
            store.reserve(row, length)
    assert len(compactions) // layers <= 2


def test_rows_of_very_different_lengths_run_in_one_forward_as_they_run_alone():
    """A 3-position row beside a 100-position one (more blocks than a fresh row's table holds) in one forward."""
    server = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    d, gen = server.hidden_size, torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, n, d, generator=gen) for n in (3, 100)]
    step = torch.randn(2, 1, d, generator=gen)
    alone = []
    for prompt, x in zip(prompts, step):
        row = server.store.new_row(2)
        server.layers.store_forward([row], prompt, torch.arange(prompt.shape[1])[None])
        alone.append(server.layers.store_forward([row], x[None], torch.tensor([[row.length]])))
    rows = [server.store.new_row(2) for _ in prompts]
    for row, prompt in zip(rows, prompts):
        server.layers.store_forward([row], prompt, torch.arange(prompt.shape[1])[None])
    together = server.layers.store_forward(rows, step, torch.tensor([[3], [100]]))
    server.shutdown()
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_a_nan_left_in_the_store_by_one_session_never_reaches_another():
    """Masked positions are still read: a NaN there would spread (0 x NaN). A row never reads another's data."""
    server = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    d, store = server.hidden_size, server.store
    poisoned = store.new_row(2)
    server.layers.store_forward([poisoned], torch.full((1, 5, d), float("nan")), torch.arange(5)[None])
    store.release(poisoned)
    short, long = store.new_row(2), store.new_row(2)  # the short row reuses the poisoned row's block
    server.layers.store_forward([short], torch.randn(1, 3, d), torch.arange(3)[None])
    server.layers.store_forward([long], torch.randn(1, 40, d), torch.arange(40)[None])
    out = server.layers.store_forward([short, long], torch.randn(2, 1, d), torch.tensor([[3], [40]]))
    server.shutdown()
    assert bool(torch.isfinite(out).all())


def test_a_nan_a_live_row_holds_never_reaches_a_shorter_row_batched_beside_a_longer_one():
    """The short row's block table is padded to the long row's length: the padding must read the zero block, never
    a block another row still holds (its NaN would spread through the masked columns)."""
    server = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    d, store = server.hidden_size, server.store
    poisoned = store.new_row(2)  # keeps its blocks, NaN in them
    server.layers.store_forward([poisoned], torch.full((1, 5, d), float("nan")), torch.arange(5)[None])
    short, long = store.new_row(2), store.new_row(2)
    server.layers.store_forward([short], torch.randn(1, 3, d), torch.arange(3)[None])
    server.layers.store_forward([long], torch.randn(1, 40, d), torch.arange(40)[None])
    out = server.layers.store_forward([short, long], torch.randn(2, 1, d), torch.tensor([[3], [40]]))
    server.shutdown()
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_tested_architecture_runs_on_the_store(arch):
    assert SplitServer(tiny_model(arch)).store is not None


def test_a_model_without_sdpa_attention_keeps_transformers_caches_and_stays_exact(model_pair):
    ref, split = model_pair("llama")
    split.config._attn_implementation = "eager"
    model = SlicerModelForCausalLM.from_model(split, SlicerConfig(codec="identity", split_layer=2))
    assert model.split_server.store is None
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)


@pytest.mark.parametrize(
    "arch, prepack",
    [("llama", False), ("mistral", False), ("gpt2", False), ("llama", True), ("mistral", True)],
    ids=["llama", "mistral", "gpt2", "llama-prepacked", "mistral-prepacked"],
)
def test_32_sessions_at_mixed_splits_joining_and_leaving_generate_exactly(arch, prepack):
    """32 clients on one batching server, at split layers 1..3, with prompts of 1..40 tokens (mistral's sliding
    window is 16) and 4..20 new tokens, starting at staggered times: every one equals plain `generate()`, with the
    served layers' weights as loaded or packed for oneDNN."""
    ref = tiny_model(arch)
    server = SplitServer(
        copy.deepcopy(ref),
        batching=True,
        min_split_layer=1,
        limits=ServerLimits(prefill_chunk_tokens=8),
        prepack=prepack,
    )
    linears = sum(type(m) is torch.nn.Linear for layer in compat.decoder_layers(ref)[1:] for m in layer.modules())
    assert server.stats_dict()["prepacked_linears"] == (linears if prepack else 0)
    rng = random.Random(0)
    jobs = []
    for i in range(32):
        ids = torch.randint(3, 120, (1, rng.randint(1, 40)), generator=torch.Generator().manual_seed(i))
        new = rng.randint(4, 20)
        want = ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        jobs.append((ids, new, 1 + i % 3, want))
    got: dict[int, torch.Tensor] = {}

    def client(i: int) -> None:
        ids, new, split, _ = jobs[i]
        time.sleep(0.01 * (i % 8))  # staggered: sessions join while others decode
        got[i] = split_client(ref, server, split).generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    run_together(*(lambda i=i: client(i) for i in range(32)))
    stats = server.stats_dict()
    server.shutdown()
    assert stats["kv_store"] == 1
    assert stats["batched_rows"] > stats["batches"]  # decode steps did run together
    for i, (_, _, _, want) in enumerate(jobs):
        assert torch.equal(got[i], want), f"session {i} (split {jobs[i][2]}) differs"


def test_a_left_padded_batch_session_is_exact_beside_single_sessions(model_pair):
    ref, _ = model_pair("qwen2")
    server = SplitServer(copy.deepcopy(ref), batching=True, min_split_layer=1)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = {}

    def padded():
        model = split_client(ref, server, 2)
        out["padded"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)

    def single():
        out["single"] = split_client(ref, server, 1).generate(ids[1:], max_new_tokens=6, do_sample=False)

    run_together(padded, single)
    server.shutdown()
    assert torch.equal(out["padded"], want)
    assert torch.equal(out["single"], ref.generate(ids[1:], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_positions_and_a_row_of_padding_alone_answer_as_in_transformers(model_pair, arch):
    """A padding position sees no key; the store answers it as transformers' SDPA does (zeros), not otherwise."""
    ref, _ = model_pair(arch)
    server = SplitServer(copy.deepcopy(ref))
    assert server.store is not None
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    config = SlicerConfig(codec="identity", split_layer=2, downlink="logits")
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, transport=LocalTransport(server))
    labels = ids.masked_fill(mask == 0, -100)  # the first real token is still predicted from a padding position
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    server.shutdown()


def test_decode_logits_of_a_grouped_query_model_are_bit_equal_to_transformers(model_pair):
    """Not only the tokens: the store calls SDPA as transformers does, so not one bit of a score differs."""
    ref, _ = model_pair("llama")  # 4 query heads on 2 K/V heads
    assert ref.config.num_key_value_heads < ref.config.num_attention_heads
    server = SplitServer(copy.deepcopy(ref))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    want = ref.generate(torch.tensor([[5, 6, 7, 8]]), **kwargs)
    got = split_client(ref, server, 2).generate(torch.tensor([[5, 6, 7, 8]]), **kwargs)
    server.shutdown()
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


def _open(server: SplitServer, split_layer: int) -> int:
    body = open_request(
        SlicerConfig(codec="identity"), server.model.config, "tiny", split_layer, build_codec("identity")
    )
    reply = server.handle(protocol.encode_json(protocol.OPEN, body))
    protocol.raise_if_error(reply)
    return protocol.decode_json(reply)["session"]


def _step(server: SplitServer, session: int, seq: int, start: int, tokens: int) -> bytes:
    payload = build_codec("identity").encode(torch.randn(1, tokens, server.hidden_size))
    return server.handle(protocol.encode_step(protocol.Step(session, seq, start, 1, tokens, tokens - 1, payload)))


def a_prompt_beside_five_decode_steps(server: SplitServer) -> list[tuple[str, int]]:
    """The forwards (what each ran: "prompt" or "decode", and its positions) of a prompt of 200 positions and five
    decode steps of another session, sent together: the first round holds the prompt and the first decode step."""
    decoder, prompt = _open(server, 2), _open(server, 2)
    protocol.raise_if_error(_step(server, decoder, 0, 0, 4))
    runs: list[tuple[str, int]] = []
    run = server.scheduler._run
    server.scheduler._run = lambda chunks, prefill: (
        runs.extend(("decode" if c.work.step.tokens == 1 else "prompt", c.hidden.shape[1]) for c in chunks),
        run(chunks, prefill),
    )[1]
    both, submitted, submit, decode_packets = threading.Event(), [], server.submit, server.decode_packets

    def counted(*args):
        reply = submit(*args)
        submitted.append(reply)
        if len(submitted) == 2:
            both.set()
        return reply

    server.submit = counted
    server.decode_packets = lambda works: (both.wait(10), decode_packets(works))[1]
    run_together(
        lambda: protocol.raise_if_error(_step(server, prompt, 0, 0, 200)),
        lambda: [protocol.raise_if_error(_step(server, decoder, seq, 3 + seq, 1)) for seq in range(1, 6)],
    )
    server.shutdown()
    return runs


def test_a_long_prefill_is_chunked_between_decode_rounds():
    server = SplitServer(
        tiny_model("llama"), batching=True, limits=ServerLimits(prefill_chunk_tokens=16, max_batch_tokens=24)
    )
    runs = a_prompt_beside_five_decode_steps(server)
    prompt = [i for i, (what, _) in enumerate(runs) if what == "prompt"]
    assert len(prompt) >= 200 // 16  # in chunks, at most 16 positions (24 in a round, less the decode rows)
    assert runs.index(("decode", 1)) < prompt[-1]  # a decode step went through while the prompt was running


def test_without_the_store_a_long_step_runs_in_chunks_and_other_sessions_steps_run_between_them():
    """Store-less servers (hybrid families among them) ran a step whole: one message of 2^23 zero values held the
    compute thread 5 s on a tiny Qwen3-Next, and every other session waited."""
    server = SplitServer(tiny_model("llama"), kv_store=False, limits=ServerLimits(prefill_chunk_tokens=16))
    runs = a_prompt_beside_five_decode_steps(server)
    prompt = [i for i, run in enumerate(runs) if run[0] == "prompt"]
    assert [runs[i][1] for i in prompt] == [16] * (200 // 16) + [200 % 16]  # the prompt, 16 positions at a time
    assert runs.index(("decode", 1)) < prompt[2]  # the first decode step came in after its first: ran before its third


def test_decode_rows_filling_the_round_still_leave_the_oldest_prefill_an_eighth_of_a_chunk():
    server = SplitServer(
        tiny_model("llama"), batching=True, limits=ServerLimits(prefill_chunk_tokens=16, max_batch_tokens=1)
    )
    chunks = []
    plain = server.scheduler._run
    server.scheduler._run = lambda run, prefill: chunks.append(run[0].hidden.shape[1]) or plain(run, prefill)
    protocol.raise_if_error(_step(server, _open(server, 2), 0, 0, 40))
    server.shutdown()
    assert chunks == [2] * 20  # not 40 rounds of one position


def positions_per_round(server: SplitServer) -> list[int]:
    """The positions (of every sequence) each of the scheduler's rounds runs from now on, filled in as they run."""
    rounds, current = [], []
    plain_round, plain_run = server.scheduler._round, server.scheduler._run
    server.scheduler._run = lambda run, prefill: (
        current.append(sum(c.work.rows * c.hidden.shape[1] for c in run)) or plain_run(run, prefill)
    )

    def counted_round(pending):
        current.clear()
        left = plain_round(pending)
        rounds.append(sum(current))
        return left

    server.scheduler._round = counted_round
    return rounds


def queued_behind_a_first_step(server: SplitServer, first: bytes, *then: bytes) -> None:
    """Submit `first`, hold the compute thread while it is decoded, so that `then` queue for the next round; wait for
    every reply."""
    held, gate = threading.Event(), threading.Event()
    decode = server.decode_packets
    server.decode_packets = lambda works: (held.set(), gate.wait(10) if not gate.is_set() else None, decode(works))[2]
    replies = [server.submit(first)]
    assert held.wait(10)
    replies += [server.submit(message) for message in then]
    gate.set()
    for reply in replies:
        protocol.raise_if_error(reply.result(timeout=60))


def rows_message(server: SplitServer, session: int, seq: int, start: int, rows: int, tokens: int) -> bytes:
    """A step of `rows` sequences of `tokens` random positions from `start`, the last one's output wanted."""
    payload = build_codec("identity").encode(torch.randn(rows, tokens, server.hidden_size))
    return protocol.encode_step(protocol.Step(session, seq, start, rows, tokens, tokens - 1, payload))


def test_a_round_runs_no_more_positions_than_max_batch_tokens_but_the_oldest_prefills_floor():
    """The floor is the oldest prefill's alone, and counts positions of all its sequences; what is left goes to the
    prefills that fit in it."""
    server = SplitServer(
        tiny_model("llama"), batching=True, limits=ServerLimits(prefill_chunk_tokens=64, max_batch_tokens=64)
    )
    rounds = positions_per_round(server)
    blocker, one, many, few = (_open(server, 2) for _ in range(4))
    prefills = [
        rows_message(server, s, 0, 0, rows, tokens) for s, rows, tokens in ((one, 1, 60), (many, 16, 20), (few, 1, 10))
    ]
    queued_behind_a_first_step(server, rows_message(server, blocker, 0, 0, 1, 1), *prefills)
    server.shutdown()
    assert sum(rounds) == 1 + 60 + 16 * 20 + 10 and max(rounds) <= 64, rounds
    assert rounds[:2] == [1, 64]  # the 16 sequences fit in none of the 4 positions left; the single one took them


def test_a_rounds_decode_rows_count_against_max_batch_tokens():
    """A round holding decode steps leaves the prefills max_batch_tokens less those rows, not the whole budget."""
    limits = ServerLimits(prefill_chunk_tokens=64, max_batch_tokens=64, batch_wait_s=0)
    server = SplitServer(tiny_model("llama"), batching=True, limits=limits)
    blocker, decoder, prompt = (_open(server, 2) for _ in range(3))
    protocol.raise_if_error(server.handle(rows_message(server, decoder, 1, 0, 3, 4)))  # 3 sequences, 4 positions
    rounds = positions_per_round(server)
    queued_behind_a_first_step(
        server,
        rows_message(server, blocker, 1, 0, 1, 1),
        rows_message(server, decoder, 2, 4, 3, 1),  # a decode step of 3 rows
        rows_message(server, prompt, 1, 0, 1, 100),  # a prefill that would fill a round
    )
    server.shutdown()
    assert sum(rounds) == 1 + 3 + 100 and max(rounds) <= 64, rounds
    assert rounds[:2] == [1, 64], rounds  # 3 decode rows + 61 prefill positions


def test_a_compaction_that_runs_out_of_memory_never_leaves_a_row_on_a_free_block(monkeypatch):
    """Its moves are made in place first; if cutting the pools then fails, the blocks above those in use go back as
    free blocks (zeroed before reuse): the next row is never given one a row still holds."""
    store = KVStore(2, torch.device("cpu"), torch.float32, block_size=4)
    gone, kept = store.new_row(0), store.new_row(0)
    store.reserve(gone, 8)
    store.reserve(kept, 8)
    for layer in range(2):
        for which in ("k", "v"):
            pool = store.pool(layer, which, torch.zeros(1, 2, 1, 3))
            pool[:, store.slots(kept.blocks[layer, :2])] = torch.randn(2, 8, 3)
    data = {key: pool[:, store.slots(kept.blocks[key[0], :2])].clone() for key, pool in store.pools.items()}
    store.release(gone)  # its blocks, below the kept row's, fall free: a compaction moves the kept row down

    def held_intact():
        for key, pool in store.pools.items():
            assert torch.equal(pool[:, store.slots(kept.blocks[key[0], :2])], data[key])

    clone, calls = torch.Tensor.clone, []

    def clone_until_out_of_memory(tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # cutting the layer's second pool
            raise RuntimeError("out of memory (simulated)")
        return clone(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone_until_out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        store._compact(0)
    monkeypatch.setattr(torch.Tensor, "clone", clone)
    held_intact()
    assert not set(kept.blocks[0, :2].tolist()) & set(store._free[0])
    newcomer = store.new_row(0)
    store.reserve(newcomer, 8)
    assert not set(newcomer.blocks[0, :2].tolist()) & set(kept.blocks[0, :2].tolist())
    store.release(newcomer)
    store._compact(0)  # and now for real
    assert kept.blocks[0, :2].tolist() == [1, 2] and store._free[0] == []
    held_intact()


@pytest.mark.parametrize(
    "family, window, store",
    [
        ("mistral", 600, True),  # its attention names the window its cache keeps: the store masks the same
        ("phimoe", 8, True),  # names none, but the check runs past the window and finds the store right
        ("phimoe", 600, False),  # names none, and the check cannot run past it (chunks, or moshi's causal mask?)
    ],
)
def test_a_window_the_start_up_check_cannot_test_must_be_the_one_the_attention_names(family, window, store):
    from transformers import AutoModelForCausalLM, MistralConfig, PhimoeConfig

    config = (MistralConfig if family == "mistral" else PhimoeConfig)(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=97, sliding_window=window, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    server = SplitServer(AutoModelForCausalLM.from_config(config).eval(), batching=True)
    assert (server.store is not None) == store
    assert server.store is None or server.store.sliding_windows[1:] == [window] * 2
    server.shutdown()


def test_the_pools_the_start_up_check_filled_are_cut_back_within_the_kv_budget():
    """The check prefills up to 512 positions past a sliding window; its pools stayed (1.2 MB against a 64 KiB
    budget) until a 5 s idle trim, which steady traffic never leaves room for."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=97, sliding_window=600, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    budget = 64 << 10
    server = SplitServer(AutoModelForCausalLM.from_config(config).eval(), limits=ServerLimits(kv_budget_bytes=budget))
    zero_blocks = 3 * compat.kv_bytes_per_position(config, 2, server.dtype, False) * server.store.block_size
    assert server.store.bytes_allocated() <= budget + zero_blocks
    server.shutdown()


def test_closing_sessions_returns_their_blocks():
    server = SplitServer(tiny_model("llama"), batching=True)
    sessions = [_open(server, 1 + i % 3) for i in range(5)]
    for session in sessions:
        protocol.raise_if_error(_step(server, session, 0, 0, 20))
    assert server.store.blocks_in_use() > 0
    for session in sessions:
        server.close_session(session)
    deadline = time.monotonic() + 5
    while server.store.blocks_in_use() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.store.blocks_in_use() == 0 and server.kv_bytes_used == 0
    server.shutdown()


def test_a_session_far_longer_than_the_rest_decodes_in_a_forward_of_its_own_after_theirs(monkeypatch):
    """A forward's rows attend over its longest row's context: one session of 16,000 positions made every other
    session's decode step cost that much (8 clients went from 5 to 98 ms a step)."""
    import slicer_hf.server.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "SPLIT_PADDING", 100)
    server = SplitServer(tiny_model("llama"), batching=True, limits=ServerLimits(batch_wait_s=0))
    sessions = [_open(server, 2) for _ in range(5)]
    for session, length in zip(sessions, [200, 10, 12, 11, 10]):  # the first: 4 x ~190 positions of padding
        protocol.raise_if_error(_step(server, session, 0, 0, length))
    forwards: list[list[int]] = []
    plain = server.scheduler._run
    server.scheduler._run = lambda run, prefill: forwards.append([c.session.length for c in run]) or plain(run, prefill)
    held, gate = threading.Event(), threading.Event()  # hold the compute thread until every decode step is queued
    decode = server.decode_packets
    server.decode_packets = lambda works: (held.set(), gate.wait(10) if not gate.is_set() else None, decode(works))[2]
    blocker = _open(server, 2)
    replies = [server.submit(protocol.encode_step(protocol.Step(blocker, 0, 0, 1, 1, 0, build_codec("identity").encode(
        torch.randn(1, 1, server.hidden_size)))))]  # fmt: skip
    assert held.wait(10)
    for session, length in zip(sessions, [200, 10, 12, 11, 10]):
        payload = build_codec("identity").encode(torch.randn(1, 1, server.hidden_size))
        replies.append(server.submit(protocol.encode_step(protocol.Step(session, 1, length, 1, 1, 0, payload))))
    gate.set()
    for reply in replies:
        protocol.raise_if_error(reply.result(timeout=60))
    server.shutdown()
    assert forwards[-2:] == [[10, 10, 11, 12], [200]]  # the short ones first, together


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3"])
def test_a_session_is_charged_what_its_blocks_hold_in_the_pools(model_type):
    """deepseek's layers cache a compressed latent, far narrower than their heads: charged by the config's heads, a
    session cost 10x what it held and sessions were refused with the pools a tenth full."""
    from slicer_hf.bench.architectures import tiny_model as family_model

    server = SplitServer(family_model(model_type), limits=ServerLimits(idle_timeout_s=float("inf")))
    session = _open(server, 1)
    protocol.raise_if_error(_step(server, session, 0, 0, 16))
    assert server.kv_bytes_used == _block_bytes(server, 1)
    server.shutdown()


def test_a_session_is_opened_only_where_a_block_of_its_positions_fits_the_budget():
    """A step takes whole blocks: a session opened with room for a position but not for a block would be refused
    at its first step, whatever its size."""
    probe = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    block = _block_bytes(probe, 1)
    probe.shutdown()
    server = SplitServer(
        tiny_model("llama"), limits=ServerLimits(kv_budget_bytes=block + block // 2, idle_timeout_s=float("inf"))
    )
    first = _open(server, 1)
    protocol.raise_if_error(_step(server, first, 0, 0, 16))
    with pytest.raises(ProtocolError, match=f"a block of 16 positions at split 1 needs {block:,}") as refused:
        _open(server, 1)
    assert refused.value.code == "kv_budget"
    server.close_session(first)
    protocol.raise_if_error(_step(server, _open(server, 1), 0, 0, 16))  # room again
    server.shutdown()
    capped = SplitServer(
        tiny_model("llama"), limits=ServerLimits(max_session_kv_bytes=block // 2, idle_timeout_s=float("inf"))
    )
    refusal = f"session KV cap: a block of 16 positions at split 1 needs {block:,}"
    with pytest.raises(ProtocolError, match=refusal) as cap:  # a cap below one block: no session could take a step
        _open(capped, 1)
    assert cap.value.code == "kv_session_cap"
    capped.shutdown()


def _block_bytes(server: SplitServer, split_layer: int) -> int:
    """A block of every pool of the layers a session at `split_layer` runs (each holds the K or V its layer writes)."""
    return sum(
        pool.shape[0] * pool.shape[2] * pool.element_size() * server.store.block_size
        for (layer, _), pool in server.store.pools.items()
        if layer >= split_layer
    )


def test_an_idle_server_gives_back_what_a_burst_left_in_its_pools_and_its_sessions_go_on_exactly(monkeypatch):
    """The pools grow for a burst of sessions and kept that size once they left; idle a while, the compute thread
    compacts them to the blocks still held (moving a remaining session's blocks), which carries on as before."""
    from live import wait_for

    from slicer_hf.server import scheduler

    monkeypatch.setattr(scheduler, "IDLE_TRIM_S", 0.05)
    codec, gen = build_codec("identity"), torch.Generator().manual_seed(0)
    prompt, more = torch.randn(1, 20, 64, generator=gen), torch.randn(1, 1, 64, generator=gen)

    def step(server, session, seq, start, hidden):
        reply = server.handle(
            protocol.encode_step(protocol.Step(session, seq, start, 1, hidden.shape[1], 0, codec.encode(hidden)))
        )
        return codec.decode(protocol.decode_reply(reply)[2])

    calm = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    alone = _open(calm, 1)
    step(calm, alone, 1, 0, prompt)
    want = step(calm, alone, 2, 20, more)
    calm.shutdown()

    server = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    burst = [_open(server, 1) for _ in range(8)]
    for session in burst:
        protocol.raise_if_error(_step(server, session, 1, 0, 64))
    kept = _open(server, 1)  # its blocks come after the burst's: the trim moves them
    step(server, kept, 1, 0, prompt)
    peak = server.store.bytes_allocated()
    for session in burst:
        server.close_session(session)
    assert wait_for(lambda: server.store.bytes_allocated() < peak / 4)
    assert torch.equal(step(server, kept, 2, 20, more), want)
    server.shutdown()


def test_an_idle_server_gives_the_c_heap_back_again_while_it_stays_idle(monkeypatch):
    """Other threads free memory too (gRPC's buffers, a refused message's): trimmed once as the compute thread went
    idle, what they freed later had stayed with the process."""
    from live import wait_for

    from slicer_hf.server import scheduler

    trims = []
    monkeypatch.setattr(scheduler, "IDLE_TRIM_S", 0.05)
    monkeypatch.setattr(scheduler, "IDLE_HEAP_TRIM_S", 0.05)
    monkeypatch.setattr(scheduler, "_trim_heap", lambda: trims.append(1))
    server = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    try:
        protocol.raise_if_error(_step(server, _open(server, 1), 1, 0, 4))  # the compute thread ran, then idles
        assert wait_for(lambda: len(trims) >= 3, timeout_s=30)
    finally:
        server.shutdown()


def test_a_released_row_is_not_kept_alive_by_the_store():
    """A row given back holds no blocks: the store must not keep it (a long-running server would keep every row of
    every sequence it ever served, and each compaction would walk them all)."""
    store = KVStore(num_layers=3, device=torch.device("cpu"), dtype=torch.float32, block_size=4)
    rows = [store.new_row(1) for _ in range(3)]
    for row in rows:
        store.reserve(row, 9)
    refs = [weakref.ref(row) for row in rows]
    store.release(rows[0])
    store.truncate(rows[1], 0)
    del rows, row
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
