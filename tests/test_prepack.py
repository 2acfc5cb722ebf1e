"""Linear weights packed for oneDNN on a CPU server: the same products as `nn.Linear`, only in the blocks served, and
split generation through such a server still equals plain `generate()`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model

from slicer_hf import SlicerConfig, SlicerModelForCausalLM
from slicer_hf.server import SplitServer
from slicer_hf.server.prepack import PackedLinear, packable, prepack_linears
from slicer_hf.transport import LocalTransport

CPU = torch.device("cpu")
DTYPES = [torch.float32] + ([torch.bfloat16] if packable(CPU, torch.bfloat16) else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_what_the_linear_does(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    packed = PackedLinear(linear.weight, linear.bias)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for x in (torch.randn(1, 96), torch.randn(5, 7, 96), torch.randn(96, 6).T):  # rows, [B, T, d], strided
        x = x.to(dtype)
        want = linear(x)
        assert packed(x).shape == want.shape and packed(x).dtype == dtype
        torch.testing.assert_close(packed(x), want, atol=tolerance, rtol=tolerance)
    assert torch.equal(packed.weight, linear.weight)  # unpacked for code that inspects it


def test_only_the_linears_of_the_blocks_given_are_packed():
    model = tiny_model("llama")
    layers = model.model.layers
    per_layer = sum(type(m) is torch.nn.Linear for m in layers[0].modules())
    before = [m.weight.clone() for m in layers[2].modules() if type(m) is torch.nn.Linear]

    assert prepack_linears(layers[2:]) == per_layer * (len(layers) - 2)
    assert all(type(m) is not torch.nn.Linear for layer in layers[2:] for m in layer.modules())
    assert not any(isinstance(m, PackedLinear) for layer in layers[:2] for m in layer.modules())
    assert type(model.lm_head) is torch.nn.Linear
    after = [m.weight for m in layers[2].modules() if isinstance(m, PackedLinear)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_weights_onednn_cannot_run_are_left_as_they_are():
    assert not packable(torch.device("meta"), torch.float32)
    assert not packable(CPU, torch.float64)
    on_meta = torch.nn.Sequential(torch.nn.Linear(8, 8, device="meta"))
    in_float64 = torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=torch.float64))
    assert prepack_linears([on_meta, in_float64]) == 0
    assert type(on_meta[0]) is torch.nn.Linear and type(in_float64[0]) is torch.nn.Linear


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_prepacked_server_generates_exactly_what_generate_does(arch):
    ref = tiny_model(arch)
    server = SplitServer(copy.deepcopy(ref), prepack=True)
    config = SlicerConfig(codec="identity", split_layer=1)
    split = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, transport=LocalTransport(server))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    want = ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(split.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False), want)
    server.shutdown()


def test_an_encoder_server_keeps_its_blocks_as_loaded():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48)
    server = SplitServer(BertModel(config).eval(), prepack=True)
    assert server.prepacked == 0
    server.shutdown()
