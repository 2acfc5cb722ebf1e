"""The real model: SmolLM2-135M-Instruct (30 layers, d=576), converted once from the embedded GGUF."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slicer_hf import SlicerConfig, SlicerModelForCausalLM
from slicer_hf.data import default_model_path

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def chat(tokenizer, prompts):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("k", [8, 24])
def test_lossless_split_equals_plain_generate_on_smollm2(smollm2, k):
    ref, tokenizer = smollm2
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), SlicerConfig(codec="identity", split_layer=k))
    inputs = chat(tokenizer, PROMPTS)  # a left-padded batch of three chats
    expected = ref.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), expected)
    torch.manual_seed(3)
    expected = ref.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=0.9)
    torch.manual_seed(3)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=0.9), expected)


def test_slicer_preset_compresses_and_keeps_greedy_output_close(smollm2):
    ref, tokenizer = smollm2
    config = SlicerConfig.from_pretrained(
        __import__("pathlib").Path(__file__).parents[1] / "configs" / "smollm2-135m-split24"
    )
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config)
    inputs = chat(tokenizer, PROMPTS[:1])
    expected = ref.generate(**inputs, max_new_tokens=24, do_sample=False)
    got = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    stats = model.wire_stats()
    payload_bits = 8 * stats.uplink_payload_bytes / stats.tokens
    agreement = (got[0, -24:] == expected[0, -24:]).float().mean().item()
    print(
        f"slicer preset on SmolLM2: {payload_bits:.0f} codec bits/token, {stats.uplink_bits_per_token:.0f} "
        f"uplink bits/token with protocol headers, greedy agreement {agreement:.2f}"
    )
    assert payload_bits < 9216 / 2  # at least 2x smaller than fp16 hidden states
    assert agreement >= 0.5
