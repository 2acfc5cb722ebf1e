"""Partial loading: each side reads only the decoder layers it runs from safetensors checkpoints."""

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from slicer_hf.compat import decoder_layers
from slicer_hf.loading import load_layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(path)
    return path


def on_meta(model):
    return [all(p.device.type == "meta" for p in layer.parameters()) for layer in decoder_layers(model)]


@pytest.mark.parametrize("layers", [range(0, 2), range(3, 4), [0, 3]])
def test_only_the_requested_layers_hold_weights(checkpoint, layers):
    model = load_layers(checkpoint, layers, dtype=torch.float32)
    assert on_meta(model) == [i not in layers for i in range(4)]
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for i in layers:
        for (name, p), q in zip(decoder_layers(model)[i].named_parameters(), decoder_layers(full)[i].parameters()):
            assert torch.equal(p, q), name
    assert torch.equal(model.get_input_embeddings().weight, full.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, full.get_output_embeddings().weight)


def test_other_loading_options_fall_back_to_a_whole_load_then_release(checkpoint):
    model = load_layers(checkpoint, range(2), dtype=torch.float32, low_cpu_mem_usage=True)
    assert on_meta(model) == [False, False, True, True]
