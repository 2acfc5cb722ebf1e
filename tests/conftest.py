"""Shared fixtures: tiny random models of every claimed architecture, built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import copy
import logging
import logging.handlers
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)

from slicer_hf import protocol
from slicer_hf.transport import LocalTransport

VOCAB = 128
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        sliding_window=16,
        max_position_embeddings=256,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    ),
    "gemma": lambda: GemmaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    ),
    "phi": lambda: PhiConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    ),
    "gpt2": lambda: GPT2Config(
        n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    ),
    "opt": lambda: OPTConfig(
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}
ARCHITECTURES = sorted(TINY_CONFIGS)

logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves some biases/norms trivial; perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class RecordingTransport(LocalTransport):
    """An in-process server's transport that keeps the (batch, tokens) of every STEP header it carries."""

    def __init__(self, server) -> None:
        super().__init__(server)
        self.steps: list[tuple[int, int]] = []

    def request(self, data: bytes) -> bytes:
        if protocol.message_type(data) == protocol.STEP:
            protocol.decode_step(data, check=lambda step: self.steps.append((step.batch, step.tokens)))
        return super().request(data)


@pytest.fixture(scope="session")
def reference_models() -> dict[str, torch.nn.Module]:
    return {arch: tiny_model(arch) for arch in ARCHITECTURES}


@pytest.fixture
def model_pair(reference_models):
    """(plain model, an independent deep copy to make split) for an architecture."""

    def make(arch: str):
        ref = reference_models[arch]
        return ref, copy.deepcopy(ref)

    return make


def pytest_collection_modifyitems(config, items):
    """Kernel parity on CPU tensors runs only under the Triton interpreter, which must be switched on before
    triton is first imported: `test_kernels.py::test_interpreter_suite` runs those cases in a child process with
    it on. In this process they are deselected (not skipped: nothing is missing, they run there)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    keep, child_only = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        in_child = item.module.__name__.endswith("test_kernels") and (
            str(params.get("device")) == "cpu" or params.get("path") == "kernels"
        )
        (child_only if in_child else keep).append(item)
    if child_only:
        config.hook.pytest_deselected(items=child_only)
        items[:] = keep


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved to a folder, for the tests that start server processes."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The plain transformers model of `model_dir`, for the exactness checks."""
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture
def server(model_dir):
    """Start `slicer-hf serve` processes for the module's `model_dir` fixture; all are stopped afterwards."""
    from live import Server

    running = []

    def start(*args, port=0):
        running.append(Server(model_dir, *args, port=port))
        return running[-1]

    yield start
    for s in running:
        s.stop()


@pytest.fixture
def fake_hub(monkeypatch):
    """`huggingface_hub.HfApi` replaced by a recorder: what `push_to_hub` created and uploaded lands in the dict this
    fixture returns (`token`, `repo`, `files` by name); the repo holds the files named in its `existing` set (empty
    until a test fills it), and the upload answers as `upload_folder` does, with the commit's URL (and a pull
    request's, asked for one)."""
    from types import SimpleNamespace

    uploaded: dict = {"existing": set()}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def file_exists(self, repo_id, filename):
            return filename in uploaded["existing"]

        def upload_folder(self, repo_id, folder_path, commit_message, create_pr):
            from pathlib import Path

            files = Path(folder_path).iterdir()
            uploaded["files"] = {p.name: p.read_bytes() if p.suffix == ".safetensors" else p.read_text() for p in files}
            pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if create_pr else None
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", pr_url=pr_url)

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    return uploaded


@contextlib.contextmanager
def transformers_log(containing: str):
    """What transformers logs meanwhile that contains `containing` (at a user's verbosity, warnings; each anew,
    though transformers gives some once per process)."""
    seen = logging.handlers.BufferingHandler(100)
    library = logging.getLogger("transformers")
    level = library.level
    logging.Logger.warning_once.cache_clear()
    library.addHandler(seen)
    library.setLevel(logging.WARNING)  # the tests' verbosity is errors only
    logged: list[str] = []
    try:
        yield logged
    finally:
        library.removeHandler(seen)
        library.setLevel(level)
        logged += [r.getMessage() for r in seen.buffer if containing in r.getMessage()]


@pytest.fixture(autouse=True)
def _slicer_hf_logging_as_it_was():
    """A command run in-process (`serve` through typer's runner) gives slicer_hf's loggers a level and a handler on
    the runner's stderr, closed once it returns: put them back, so later tests log as before."""
    logger = logging.getLogger("slicer_hf")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
