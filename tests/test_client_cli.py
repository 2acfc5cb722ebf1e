"""`slicer-hf generate` and `slicer-hf chat` against a running server process: streamed text, exact (lossless)
replies, wire stats at the end."""

from __future__ import annotations

import pytest
from live import tiny_smol_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from slicer_hf import SlicerConfig
from slicer_hf.cli import app
from slicer_hf.launch import start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_smol_dir(tmp_path_factory.mktemp("tiny-chat"), SlicerConfig(split_layer=2, codec="identity"))


@pytest.fixture(scope="module")
def server_url(tiny_dir):
    proc, url = start_server(str(tiny_dir), ["--log-level", "warning", "--threads", "1"])
    yield url
    stop_server(proc)


def plain_reply(tiny_dir, messages, max_new_tokens):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_generate_streams_an_exact_reply_and_reports_the_wire(tiny_dir, server_url):
    args = ["generate", "--server", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    result = CliRunner().invoke(app, [*args, "--prompt", "Hello there", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    expected = plain_reply(tiny_dir, [{"role": "user", "content": "Hello there"}], 8)
    assert result.output.startswith(expected)
    assert "tokens in" in result.output and "split at layer 2 of 4" in result.output
    assert "uplink" in result.output and "bits/token" in result.output and "downlink" in result.output


def test_generate_samples_with_a_seed(tiny_dir, server_url):
    args = ["generate", "-s", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    sampled = [
        CliRunner().invoke(app, [*args, "-p", "Hi", "--max-new-tokens", "6", "--do-sample", "--seed", "3"]).output
        for _ in range(2)
    ]
    assert sampled[0].split("\n")[0] == sampled[1].split("\n")[0]


def test_chat_keeps_the_conversation(tiny_dir, server_url):
    args = ["chat", "--server", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "5"], input="Hello\nAnd then?\n/exit\n")
    assert result.exit_code == 0, result.output
    first = plain_reply(tiny_dir, [{"role": "user", "content": "Hello"}], 5)
    second = plain_reply(
        tiny_dir,
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ],
        5,
    )
    lines = result.output.split("\n")
    assert lines[1] == first and lines[2] == second
    assert "10 tokens in" in result.output and "what crossed the wire" in result.output


def test_a_client_error_is_one_line_not_a_traceback():
    """What a user gets wrong (here a URL without its scheme) reads as the library's message, exit status 1."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from slicer_hf.cli import main; main()", "stats", "127.0.0.1:50051"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: unsupported URL '127.0.0.1:50051': use grpc://host:port or grpcs://host:port"
