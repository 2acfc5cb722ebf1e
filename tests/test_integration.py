"""A split model behaves like a transformers model: pipelines take it quietly, and what it saves plain
transformers loads back."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, pipeline

from slicer_hf import ConfigError, SlicerConfig, SlicerModelForCausalLM
from slicer_hf.config import CONFIG_NAME

LOSSLESS = SlicerConfig(codec="identity", split_layer=2)


class FakeTokenizer:
    """Just enough tokenizer for the text-generation pipeline, with no download: bytes as token ids."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1
    padding_side, chat_template = "left", None
    model_max_length = 256

    def __call__(self, text, return_tensors=None, add_special_tokens=False, **kwargs):
        ids = torch.tensor([[3 + b % 120 for b in text.encode()]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True, **kwargs):
        return "".join(chr(97 + int(i) % 26) for i in ids)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_text_generation_pipeline_takes_a_split_model_quietly():
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), LOSSLESS)
    collect = Collect()
    logging.getLogger("transformers").addHandler(collect)  # transformers' loggers do not propagate to root
    try:
        generator = pipeline("text-generation", model=model, tokenizer=FakeTokenizer())
    finally:
        logging.getLogger("transformers").removeHandler(collect)
    assert not [m for m in collect.messages if "not supported" in m], collect.messages
    out = generator("hello", max_new_tokens=4, do_sample=False)
    assert len(out[0]["generated_text"]) > len("hello")


def test_a_saved_split_model_loads_back_in_plain_transformers(tmp_path):
    plain = tiny_model("llama")
    ids = torch.tensor([[5, 9, 17, 33]])
    expected = plain.generate(ids, max_new_tokens=6, do_sample=False)
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), LOSSLESS)
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.architectures == ["LlamaForCausalLM"]
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), expected)
    again = SlicerModelForCausalLM.from_pretrained(tmp_path)  # slicer_config.json in the folder is picked up
    assert again.slicer_config.codec == "identity" and again.slicer_config.split_layer == 2
    assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False), expected)
    assert type(model).__name__ == "SlicerLlamaForCausalLM"  # saving left the split model as it was


def test_the_factory_says_what_it_is():
    with pytest.raises(TypeError, match="factory, like AutoModelForCausalLM"):
        SlicerModelForCausalLM()


def test_an_edge_without_the_server_layers_moves_the_weights_it_holds():
    """`model.to(device)` (and `.cpu()`, `.to(device, dtype)`) as after any from_pretrained: the released layers
    stay released."""
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), LOSSLESS, transport="grpc://127.0.0.1:1")
    released = [p.device.type == "meta" for p in model.parameters()]
    assert model.to("cpu") is model and model.cpu() is model
    model.to(torch.device("cpu"), torch.float64)
    assert [p.device.type == "meta" for p in model.parameters()] == released and any(released)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.to(dtype=torch.float32)
    assert model.dtype == torch.float32


def test_an_edge_without_the_server_layers_refuses_to_save(tmp_path):
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), LOSSLESS, transport="grpc://127.0.0.1:1")
    with pytest.raises(ConfigError, match="holds only layers 0..1"):
        model.save_pretrained(tmp_path)
