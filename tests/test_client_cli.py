"""`slicer-hf generate` and `slicer-hf chat` against a running server process: streamed text, exact (lossless)
replies, wire stats at the end."""

from __future__ import annotations

import io
import threading

import pytest
from live import tiny_smol_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from slicer_hf import ConfigError, SlicerConfig
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


def two_turns(tiny_dir, max_new_tokens):
    """The plain model's replies to "Hello", and to "And then?" after that first reply."""
    first = plain_reply(tiny_dir, [{"role": "user", "content": "Hello"}], max_new_tokens)
    turns = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    return first, plain_reply(tiny_dir, turns, max_new_tokens)


def test_generate_streams_an_exact_reply_and_reports_the_wire(tiny_dir, server_url):
    args = ["generate", "--server", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    result = CliRunner().invoke(app, [*args, "--prompt", "Hello there", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    expected = plain_reply(tiny_dir, [{"role": "user", "content": "Hello there"}], 8)
    assert result.output.startswith(expected)
    assert "tokens in" in result.output and "split at layer 2 of 4" in result.output
    assert "uplink" in result.output and "bits/token" in result.output and "downlink" in result.output
    deeper = CliRunner().invoke(app, [*args, "--prompt", "Hello there", "--max-new-tokens", "8", "--split-layer", "3"])
    assert deeper.exit_code == 0, deeper.output  # the config's split overridden from the command line
    assert deeper.output.startswith(expected) and "split at layer 3 of 4" in deeper.output


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
    first, second = two_turns(tiny_dir, 5)
    lines = result.output.split("\n")
    assert lines[1] == first and lines[2] == second
    assert "10 tokens in" in result.output and "what crossed the wire" in result.output


def fail_in_the_second_reply(monkeypatch, error):
    """Make the chat's second reply raise `error` as it prints (once); returns what it cut short, and the printer."""
    from slicer_hf import client

    printed = client._Printer.on_finalized_text
    replies, cut = [], []

    def print_or_fail(self, text, stream_end=False):
        if len(replies) == 1 and not cut:
            cut.append(text)
            raise error
        printed(self, text, stream_end)
        if stream_end:
            replies.append(text)

    monkeypatch.setattr(client._Printer, "on_finalized_text", print_or_fail)
    return cut, printed


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tiny_dir, server_url, monkeypatch, capsys):
    """Ctrl-C mid-reply drops that turn (its session, stopped mid-step, is given up); the next turn is answered as
    if it came first, and the summary counts what every session sent. Ctrl-C at the prompt leaves with the summary."""
    from slicer_hf import client
    from slicer_hf.cli.generation import chat

    pressed, printed = fail_in_the_second_reply(monkeypatch, KeyboardInterrupt())
    args = ["chat", "--server", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    turns = "Hello\nAnd then?\nAnd then?\n/exit\n"
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "5"], input=turns)
    assert result.exit_code == 0, result.output
    assert pressed and "(stopped: this message is dropped" in result.output
    first, second = two_turns(tiny_dir, 5)
    assert first in result.output and second in result.output  # the stopped turn left no trace
    assert "10 tokens in" in result.output

    def ctrl_c_after_one_line():  # a terminal whose user types "Hello", then presses Ctrl-C
        yield "Hello\n"
        raise KeyboardInterrupt

    monkeypatch.setattr(client._Printer, "on_finalized_text", printed)
    monkeypatch.setattr("sys.stdin", ctrl_c_after_one_line())
    chat(server_url, str(tiny_dir), str(tiny_dir / "preset"), max_new_tokens=5)  # returns: no KeyboardInterrupt
    assert "5 tokens in" in capsys.readouterr().out


def test_a_reply_that_times_out_drops_its_turn_and_the_chat_goes_on(tiny_dir, server_url, monkeypatch):
    """One stalled reply had ended the chat, its conversation and its wire report with it."""
    from slicer_hf import TransportError

    message = "no reply from the server within 0.5 s (busy or stalled: raise timeout_s to wait)"
    stalled, _ = fail_in_the_second_reply(monkeypatch, TransportError(message, retryable=False, timed_out=True))
    args = ["chat", "--server", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    turns = "Hello\nAnd then?\nAnd then?\n/exit\n"
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "5", "--timeout-s", "30"], input=turns)
    assert result.exit_code == 0, result.output
    assert stalled and "within 0.5 s (busy or stalled: raise timeout_s to wait) (this message is dropped" in (
        result.output
    )
    first, second = two_turns(tiny_dir, 5)
    assert first in result.output and second in result.output  # the timed-out turn left no trace
    assert "10 tokens in" in result.output


def test_a_chat_whose_server_refuses_its_token_ends_with_the_error(tiny_dir, server_url, monkeypatch):
    """Only a timeout drops a turn: a refused token (or no server at all) had dropped every turn and exited 0."""
    from slicer_hf import TransportError, client

    def refused(self, text, stream_end=False):
        raise TransportError("grpc://x: UNAUTHENTICATED: missing or wrong auth token", retryable=False)

    monkeypatch.setattr(client._Printer, "on_finalized_text", refused)
    args = ["chat", "--server", server_url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "2"], input="Hello\nAnd then?\n/exit\n")
    assert isinstance(result.exception, TransportError) and "dropped" not in result.output  # main() prints it


def test_a_clients_timeout_is_its_transports(tiny_dir, server_url):
    from slicer_hf.client import Client

    edge = Client(server_url, str(tiny_dir), str(tiny_dir / "preset"), timeout_s=7.5)
    assert edge.model._slicer_transport.timeout_s == 7.5
    edge.close()


def test_a_chats_summary_counts_the_wire_of_every_session_it_had(tiny_dir, server_url):
    """A reply stopped with Ctrl-C gives its session up (`restart`): the summary had counted the last session alone."""
    from slicer_hf.client import Client, Sampling

    client = Client(server_url, str(tiny_dir), str(tiny_dir / "preset"))
    client.reply([{"role": "user", "content": "Hello"}], Sampling(max_new_tokens=5), out=io.StringIO())
    first = client.model.wire_stats()
    client.restart()
    client.reply([{"role": "user", "content": "And then?"}], Sampling(max_new_tokens=5), out=io.StringIO())
    second = client.model.wire_stats()
    summary = client.summary(1.0, 10)
    client.close()
    assert f"{first.uplink_bytes + second.uplink_bytes:,} B in" in summary
    assert f"{first.tokens + second.tokens} token positions" in summary


def test_a_conversation_sends_its_new_turn_not_the_whole_conversation_again(tiny_dir, server_url):
    """The server holds the conversation so far: each turn sends what follows what it shares with the last one."""
    import io

    from slicer_hf.client import Client, Sampling

    client = Client(server_url, str(tiny_dir), str(tiny_dir / "preset"))
    messages = [{"role": "user", "content": "Hello"}]
    first, _, _ = client.reply(messages, Sampling(max_new_tokens=5), out=io.StringIO())
    prompt = client.encode(messages)["input_ids"].shape[1]
    client.model.reset_wire_stats()
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second, _, new = client.reply(messages, Sampling(max_new_tokens=5), out=io.StringIO())
    conversation = client.encode(messages)["input_ids"].shape[1]
    assert (first, second) == two_turns(tiny_dir, 5)  # what the whole conversation again gives
    assert client.model.wire_stats().tokens <= conversation - prompt + new  # the first turn's prompt not again
    client.close()


def test_a_turn_reruns_the_whole_conversation_only_when_the_server_no_longer_holds_its_cache(tiny_dir, server_url):
    """Any library error while continuing the cache ran the whole conversation again: a server's timeout was waited
    out twice, and the failed attempt's text streamed, then the whole transcript as if it were the reply."""
    import io

    from slicer_hf.client import Client, Sampling
    from slicer_hf.errors import TransportError

    client = Client(server_url, str(tiny_dir), str(tiny_dir / "preset"))
    messages = [{"role": "user", "content": "Hello"}]
    first, _, _ = client.reply(messages, Sampling(max_new_tokens=5), out=io.StringIO())
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    generate, calls = client.model.generate, []

    def stalls_once(*args, **kwargs):
        calls.append(kwargs)
        raise TransportError("no reply within 3 s")

    client.model.generate = stalls_once
    with pytest.raises(TransportError):
        client.reply(messages, Sampling(max_new_tokens=5), out=io.StringIO())
    assert len(calls) == 1  # not again without the cache
    client.model.generate = generate
    client.reply(messages[:1], Sampling(max_new_tokens=5), out=io.StringIO())
    client.model.close_session()  # the server forgets what the held cache holds
    out = io.StringIO()
    second, _, _ = client.reply(messages, Sampling(max_new_tokens=5), out=out)
    assert (first, second) == two_turns(tiny_dir, 5) and out.getvalue().strip() == second.strip()
    client.close()


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


@pytest.fixture
def no_model_loads(monkeypatch):
    """A command that gets as far as loading a model fails the test: bad arguments are refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("slicer_hf.server.build.load_server", refuse)
    monkeypatch.setattr("slicer_hf.client.Client", refuse)


@pytest.fixture
def pem(tmp_path):
    from live import self_signed_localhost

    self_signed_localhost(tmp_path)
    (tmp_path / "not.pem").write_text("not a certificate\n")
    (tmp_path / "binary.der").write_bytes(b"\x30\x82\xff\x00")
    return tmp_path


BAD_ARGUMENTS = {
    "a missing certificate file": ["serve", "--tls-cert", "{tmp}/missing.pem", "--tls-key", "{tmp}/key.pem"],
    "a certificate without its key": ["serve", "--tls-cert", "{tmp}/cert.pem"],
    "a key without its certificate": ["serve", "--tls-key", "{tmp}/key.pem"],
    "a certificate that is not PEM": ["serve", "--tls-cert", "{tmp}/not.pem", "--tls-key", "{tmp}/key.pem"],
    "a key that is not the certificate's": ["serve", "--tls-cert", "{tmp}/cert.pem", "--tls-key", "{tmp}/cert.pem"],
    "an empty token": ["serve", "--token", ""],
    "autoscale not numbers": ["serve", "--ray", "--autoscale", "1,x"],
    "autoscale MIN over MAX": ["serve", "--ray", "--autoscale", "3,1"],
    "no replicas": ["serve", "--ray", "--replicas", "0"],
    "a drain timeout without a fleet": ["serve", "--drain-timeout-s", "5"],
    "a negative drain timeout": ["serve", "--ray", "--drain-timeout-s", "-1"],
    "a dtype that is none": ["serve", "--dtype", "bogus"],
    "a device that is none": ["serve", "--device", "gpu0"],
    "a metrics port for a fleet": ["serve", "--ray", "--metrics-port", "9100"],
    "a port for a fleet": ["serve", "--ray", "--port", "50052"],
    "a fleet that can never scale up": ["serve", "--ray", "--autoscale", "1,4", "--max-sessions", "16"],
    "autoscaling without a fleet": ["serve", "--autoscale", "2,16"],
    "replicas without a fleet": ["serve", "--replicas", "3"],
    "a router port without a fleet": ["serve", "--router-port", "8080"],
    "an app name without a fleet": ["serve", "--app-name", "second"],
    "a route prefix without a slash": ["serve", "--ray", "--route-prefix", "second"],
    "no new tokens": ["generate", "-s", "grpc://127.0.0.1:1", "-p", "hi", "--max-new-tokens", "0"],
    "negative new tokens": ["chat", "-s", "grpc://127.0.0.1:1", "--max-new-tokens", "-1"],
    "sampling at temperature 0": [
        "generate",
        "-s",
        "grpc://127.0.0.1:1",
        "-p",
        "hi",
        "--do-sample",
        "--temperature",
        "0",
    ],
    "a root certificate that is not PEM": ["generate", "-s", "grpcs://h:1", "-p", "hi", "--root-cert", "{tmp}/not.pem"],
    "a binary root certificate": ["stats", "grpcs://h:1", "--root-cert", "{tmp}/binary.der"],
    "a missing root certificate": ["drain", "grpcs://h:1", "--root-cert", "{tmp}/missing.pem"],
    "a port past 65535": ["serve", "--port", "70000"],
    "a negative port": ["serve", "--port", "-1"],
    "a metrics port past 65535": ["serve", "--metrics-port", "70000"],
    "a router port past 65535": ["serve", "--ray", "--router-port", "70000"],
    "no streams": ["serve", "--max-streams", "0"],
    "an unknown log level": ["serve", "--log-level", "verbose"],
    "a profile in a dtype no profile holds": ["profile", "--out", "{tmp}/p.json", "--dtype", "float64"],
    "a profile on no device": ["profile", "--out", "{tmp}/p.json", "--device", "gpu7"],
    "negative threads": ["serve", "--threads", "-1"],
    "a demo of no tokens": ["demo", "--max-new-tokens", "0"],
    "a fixed count and a range of replicas": ["serve", "--ray", "--replicas", "3", "--autoscale", "1,2"],
    "an autoscaling target without autoscaling": ["serve", "--ray", "--replicas", "2", "--sessions-per-replica", "4"],
}


@pytest.mark.parametrize("args", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_a_usage_error_before_any_model_loads(args, pem, no_model_loads):
    result = CliRunner().invoke(app, [arg.format(tmp=pem) for arg in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Invalid value" in result.output


LIMITS = [
    ("--batch-wait-ms", "-1"),
    ("--kv-memory", "0"),
    ("--max-session-kv", "0"),
    ("--max-message-bytes", "0"),
    ("--max-message-bytes", "10"),  # it started, and refused every client: an OPEN alone takes about 500 bytes
    ("--max-sessions-per-client", "0"),
]


def test_an_address_serve_cannot_listen_on_is_refused_before_the_model_loads(no_model_loads):
    """A taken port, or a host this machine does not resolve or hold, had been found after the model loaded."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for args, said in (
            (["--port", str(port)], f"port {port} on 127.0.0.1 is taken"),
            (["--host", "999.1.1.1"], "does not resolve here"),
            (["--host", "192.0.2.1"], "Cannot assign requested address"),  # TEST-NET-1: on no machine's interface
        ):
            result = CliRunner().invoke(app, ["serve", *args], terminal_width=300)
            assert result.exit_code == 2 and said in result.output, result.output


@pytest.mark.parametrize("option, value", LIMITS)
def test_a_bad_server_limit_is_named_as_the_option_the_user_typed(option, value, no_model_loads):
    result = CliRunner().invoke(app, ["serve", option, value], terminal_width=200)
    assert result.exit_code == 2 and f"Invalid value for {option}" in result.output.replace("'", ""), result.output


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["generate", "-s", "grpc://127.0.0.1:1", "-p", "hi"]])
def test_a_model_folder_that_does_not_exist_is_one_line_not_a_traceback(command):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from slicer_hf.cli import main; main()", *command, "-m", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: model '/nonexistent': no such folder"


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "-s", "grpc://127.0.0.1:1", "-p", "hi"],
        ["eval", "--text", "wikitext-2-raw-v1:test", "--max-tokens", "64", "--window", "32"],
        ["calibrate", "--split-layer", "2", "--tokens", "512", "--window", "64", "--out", "{tmp}/basis"],
        ["profile", "--tokens", "256", "--window", "64", "--out", "{tmp}/profile"],
    ],
)
def test_a_model_folder_without_its_weights_or_tokenizer_is_one_line_not_a_traceback(
    tiny_dir, tmp_path, command, missing
):
    import shutil
    import subprocess
    import sys

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / missing).unlink()
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    done = subprocess.run(
        [sys.executable, "-c", "from slicer_hf.cli import main; main()", *args, "-m", str(broken)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and str(broken) in said[0], done.stderr  # "cannot load model", or "no tokenizer for"


def test_a_served_process_stopped_by_sigterm_exits_quietly(tiny_dir):
    """`serve` freezes its heap out of the garbage collector's passes; left frozen at exit, Triton's nanobind reported
    each object as leaked (about 500 lines on every stop)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "from slicer_hf.cli import main; main()", "serve", "-m", str(tiny_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "slicer-hf serving" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "leaked" not in err, err[-2000:]


def test_a_fleet_whose_model_cannot_load_is_refused_before_ray_starts(tmp_path):
    """Every replica would fail to load it, after Ray and Serve started: the config is read first."""
    import os
    import subprocess
    import sys

    pytest.importorskip("ray")
    (tmp_path / "config.json").write_text("{}")  # a folder, but no model in it
    done = subprocess.run(
        [sys.executable, "-c", "from slicer_hf.cli import main; main()", "serve", "--ray", "-m", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot load model '{tmp_path}': Unrecognized model"), done.stderr
    assert "Ray" not in done.stderr + done.stdout


@pytest.mark.parametrize("host, warned", [("127.0.0.1", True), ("0.0.0.0", False)])
def test_a_fleet_joining_a_cluster_on_a_loopback_host_is_warned_of(monkeypatch, host, warned):
    """Replicas on other nodes listened on their own loopback and pointed clients to it: no session ever opened
    there, and the router, seeing them idle, sent every client to them first."""
    import warnings

    pytest.importorskip("ray")
    import slicer_hf.server.fleet as fleet

    def deploy(options, address=None):
        raise ConfigError(f"deployed no further (a drain of {options.drain_timeout_s} s)")

    monkeypatch.setattr(fleet, "deploy", deploy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = ["serve", "--ray", "--ray-address", "auto", "--host", host, "--drain-timeout-s", "5"]
        result = CliRunner().invoke(app, args)
    assert "deployed no further (a drain of 5.0 s)" in str(result.exception)
    assert any("joins a cluster" in str(w.message) for w in caught) == warned


def test_eval_defaults_to_the_config_generate_uses(monkeypatch):
    """For SmolLM2 its preset (the README's numbers), not SlicerConfig's defaults."""
    import slicer_hf.evaluate as evaluate
    from slicer_hf.config import DEFAULT_PRESET

    given = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: given.append(args[4]) or {})
    monkeypatch.setattr(evaluate, "format_result", lambda result: "")
    result = CliRunner().invoke(app, ["eval", "--model", "smollm2", "--dataset", "wikitext-2-raw-v1"])
    assert result.exit_code == 0, result.output
    assert given == [SlicerConfig.from_pretrained(DEFAULT_PRESET)]


def test_python_callers_get_the_clear_errors_the_cli_prints(tmp_path):
    from slicer_hf import ConfigError, SlicerModel, SlicerModelForCausalLM
    from slicer_hf.transport import make_transport

    for factory in (SlicerModelForCausalLM, SlicerModel):
        with pytest.raises(ConfigError, match=f"model '{tmp_path / 'nope'}': no such folder"):
            factory.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"unknown transport option 'tokn'.*takes \['token', 'timeout_s'"):
        make_transport("grpc://127.0.0.1:1", tokn="s3cret")
    from transformers import BertConfig

    from slicer_hf import compat

    with pytest.raises(NotImplementedError, match="does not split it; split its forward with SlicerModel"):
        compat.check_supported(BertConfig())


def test_sampling_options_are_checked_greedy_or_not_and_said_to_be_unused_when_greedy():
    import warnings

    from slicer_hf.client import Sampling

    with pytest.raises(ConfigError, match="temperature > 0"):  # a mistake either way (it had passed unseen)
        Sampling(temperature=-3)
    with pytest.warns(UserWarning, match="apply when sampling"):
        Sampling(top_k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampling(do_sample=True, temperature=0.7, top_k=5)
        Sampling()


def test_the_wire_report_of_no_token_has_no_ratio():
    from slicer_hf.client import wire_report
    from slicer_hf.link import WireStats

    report = wire_report(WireStats(), hidden_size=64)
    assert "nan" not in report and "smaller than fp16" not in report
    assert "smaller than fp16" in wire_report(WireStats(uplink_bytes=100, tokens=10), hidden_size=64)
    assert "2.05x larger than fp16" in wire_report(WireStats(uplink_bytes=2100, tokens=8), hidden_size=64)


def test_the_downlink_is_reported_per_position_that_came_back_whatever_the_prompt(tiny_dir, server_url):
    """A causal LM's prompt comes back as one row: the downlink's bits are per row back, not per position sent."""
    from slicer_hf.client import Client, Sampling

    reports = []
    for prompt in ("Hi", "Hi " * 60):
        client = Client([server_url], str(tiny_dir), str(tiny_dir / "preset"))
        client.reply([{"role": "user", "content": prompt}], Sampling(max_new_tokens=4), out=io.StringIO())
        stats = client.model.wire_stats()
        reports.append((stats.replied, stats.downlink_bits_per_token))
        assert stats.tokens > stats.replied == 4  # the prompt's last row, then one a new token
        assert "4 positions back" in client.summary(1.0, 4)
        client.close()
    (rows, bits), (rows_long, bits_long) = reports
    assert rows == rows_long and bits_long == pytest.approx(bits, abs=2)  # a session id a varint byte longer, at most


def test_a_summary_names_the_split_the_model_chose_when_the_config_names_none(tiny_dir, server_url):
    from slicer_hf.client import Client, Sampling

    client = Client(server_url, str(tiny_dir), SlicerConfig(codec="identity"))  # one URL: a string will do
    assert "split at layer 3 of 4" in client.summary(1.0, 0)  # 3/4 of the depth, not "None"
    assert client.reply([{"role": "user", "content": "Hi"}], Sampling(max_new_tokens=2), out=io.StringIO())
    client.close()


def test_an_empty_prompt_is_refused_in_one_line(tiny_dir, tmp_path):
    from slicer_hf.client import encode_messages

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = None  # plain text: nothing to send
    with pytest.raises(ConfigError, match="the prompt is empty"):
        encode_messages(tokenizer, [{"role": "user", "content": ""}])
    assert encode_messages(tokenizer, [{"role": "user", "content": "Hi"}])["input_ids"].shape[-1] > 0


def test_a_chat_turn_the_server_refuses_is_dropped_and_the_chat_goes_on(tiny_dir):
    proc, url = start_server(str(tiny_dir), ["--log-level", "warning", "--threads", "1", "--max-context-tokens", "64"])
    try:
        args = ["chat", "--server", url, "--model", str(tiny_dir), "--config", str(tiny_dir / "preset")]
        turns = "Hello\n" + "and then " * 20 + "\nAnd then?\n/exit\n"  # the second turn outgrows 64 positions
        result = CliRunner().invoke(app, [*args, "--max-new-tokens", "3"], input=turns)
    finally:
        stop_server(proc)
    assert result.exit_code == 0, result.output
    assert "exceeds 64 (this message is dropped" in result.output
    _, third = two_turns(tiny_dir, 3)
    assert third in result.output and "6 tokens in" in result.output  # the refused turn left no trace


def test_a_metrics_port_in_use_is_one_line_and_stops_the_server_it_started(tiny_dir):
    import socket

    from slicer_hf.server import SplitServer
    from slicer_hf.server.grpc_server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SplitServer(AutoModelForCausalLM.from_pretrained(tiny_dir).eval())
        threads = {t.name for t in threading.enumerate()}
        with pytest.raises(ConfigError, match=r"cannot serve metrics on 127.0.0.1:\d+: Address already in use"):
            serve(server, "127.0.0.1", 0, metrics_port=taken.getsockname()[1])
        assert "slicer-grpc-loop" not in {t.name for t in threading.enumerate()} - threads


def test_a_suites_own_threads_option_reaches_the_suite(monkeypatch):
    """`slicer-hf bench link --threads 2`: the suite's option, not the bench command's (that is --torch-threads)."""
    from typer.testing import CliRunner

    from slicer_hf.bench import link
    from slicer_hf.cli import app

    seen = []
    monkeypatch.setattr(link, "main", lambda argv: seen.append(argv))
    result = CliRunner().invoke(app, ["bench", "link", "--threads", "2", "--rates", "1", "--torch-threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen == [["--threads", "2", "--rates", "1"]]


def test_a_client_given_no_config_takes_the_smollm2_preset_for_smollm2_however_it_is_named():
    from slicer_hf.client import default_config
    from slicer_hf.data import MODEL_DIR_NAME, cache_dir

    preset = SlicerConfig.from_pretrained("smollm2-135m-split24")
    for name in ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", str(cache_dir() / MODEL_DIR_NAME)):
        assert default_config(name) == preset, name  # what a server started with the same preset serves
    assert default_config("HuggingFaceTB/SmolLM2-360M-Instruct") == SlicerConfig()


def test_a_client_given_no_config_takes_a_model_folders_own_as_from_pretrained_does(tmp_path):
    from slicer_hf.client import default_config

    own = SlicerConfig(split_layer=1, codec="identity")
    own.save_pretrained(tmp_path)
    assert default_config(str(tmp_path)) == own


def test_each_bench_suite_describes_itself_in_a_whole_paragraph(capsys):
    import importlib

    from slicer_hf.cli.measure import BENCH_SUITES

    for name, module in BENCH_SUITES.items():
        with pytest.raises(SystemExit):
            importlib.import_module(f"slicer_hf.bench.{module}").main(["--help"])
        description = capsys.readouterr().out.split("\n\n")[1]
        assert description.rstrip().endswith((".", "?")), (name, description)  # not cut at its first line


def test_every_bench_option_says_what_it_does_and_its_default(monkeypatch, capsys):
    import argparse
    import importlib

    from slicer_hf.cli.measure import BENCH_SUITES

    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for module in BENCH_SUITES.values():
        with pytest.raises(SystemExit):
            importlib.import_module(f"slicer_hf.bench.{module}").main([])
    assert len(parsers) == len(BENCH_SUITES)
    for parser in parsers:
        for action in parser._actions:
            assert action.help, (parser.prog, action.option_strings)
            shown = parser._get_formatter()._get_help_string(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "(default" in shown, (parser.prog, action.option_strings, shown)  # a default it has, shown
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        importlib.import_module("slicer_hf.bench.concurrency").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "decode steps of each client (default: 32)" in text and "(default: 1 8 32 128)" in text


@pytest.mark.parametrize(
    "command", [["profile", "--splits", "2", "--out", "{out}/p.json"], ["calibrate", "--out", "{out}/c"]]
)
def test_a_model_without_a_tokenizer_is_one_line_naming_what_it_was_needed_for(tmp_path, command):
    from conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "weights-only")
    args = [arg.format(out=tmp_path) for arg in command] + ["--model", str(tmp_path / "weights-only")]
    result = CliRunner().invoke(app, [*args, "--tokens", "256", "--window", "32"])
    from slicer_hf import ConfigError

    assert isinstance(result.exception, ConfigError)  # what the command line prints as one line
    assert "no tokenizer for" in str(result.exception) and "calibration text" in str(result.exception)


def test_a_folder_that_holds_no_model_is_named_in_one_line_by_every_command_that_loads_one(tmp_path):
    """A config folder given as --model, say: transformers' ValueError had been a traceback."""
    from slicer_hf.demo import run_demo
    from slicer_hf.evaluate import evaluate
    from slicer_hf.server.build import load_server
    from slicer_hf.tuning.calibrate import calibrate

    SlicerConfig(split_layer=2).save_pretrained(tmp_path)
    folder = str(tmp_path)
    for load in (
        lambda: evaluate(folder),
        lambda: calibrate(folder, SlicerConfig()),
        lambda: load_server(folder),
        lambda: run_demo(model=folder),
    ):
        with pytest.raises(ConfigError, match=f"cannot load model '{folder}'"):
            load()
    with pytest.raises(ConfigError, match="no such folder"):
        evaluate(str(tmp_path / "nosuch"))


def test_profile_and_calibrate_refuse_a_model_that_does_not_split_before_any_work(tmp_path):
    """An encoder had been profiled and calibrated through a random LM head, its files written, exit 0; a missing
    or empty folder had been a traceback from profile."""
    from transformers import BertConfig

    from slicer_hf.cli import app

    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "out")]
    for args, error, match in (
        (["profile", "--model", str(tmp_path / "bert"), "--no-rate-distortion"], NotImplementedError, "encoder"),
        (["calibrate", "--model", str(tmp_path / "bert")], NotImplementedError, "encoder"),
        (["profile", "--model", str(tmp_path / "nope"), "--no-rate-distortion"], ConfigError, "no such folder"),
        (["profile", "--model", str(tmp_path / "empty"), "--no-rate-distortion"], ConfigError, "cannot load model"),
    ):
        result = CliRunner().invoke(app, [*args, *out])
        assert isinstance(result.exception, error) and match in str(result.exception), (args, result.exception)
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_json_path_it_cannot_write_before_scoring():
    from slicer_hf.cli import app

    for path, match in (("tests", "is a folder"), ("README.md/out.json", "is a file")):
        result = CliRunner().invoke(app, ["eval", "--model", "nope", "--text", "README.md", "--json", path])
        assert result.exit_code == 2 and match in " ".join(result.output.split()), result.output


def test_counts_and_devices_this_machine_cannot_run_are_usage_errors_before_any_work(monkeypatch):
    from slicer_hf.bench import codec_speed
    from slicer_hf.cli import app

    monkeypatch.setattr("slicer_hf.cli.measure.BENCH_SUITES", {"codec-speed": "codec_speed"})  # no suite runs here
    monkeypatch.setattr(codec_speed, "main", lambda argv: pytest.fail(f"ran with {argv}"))

    for args, match in (
        (["bench", "all", "--model", "x"], "'all' runs every suite with its defaults"),
        (["bench", "codec-speed", "--torch-threads", "0"], "must be at least 1"),
        (["profile", "--model", "x", "--out", "p", "--threads", "0"], "--threads"),
        (["serve", "--device", "cuda:64"], "this torch sees"),
        (["profile", "--model", "x", "--out", "p", "--device", "cuda:64"], "this torch sees"),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and match in " ".join(result.output.split()), (args, result.output)


def test_serve_says_what_is_wrong_with_its_options_not_that_the_model_cannot_load(tiny_dir):
    from slicer_hf.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--min-split-layer", "40"])
    assert result.exit_code != 0
    assert "min_split_layer must be in" in str(result.exception) and "cannot load model" not in str(result.exception)


def test_a_tls_server_names_its_metrics_endpoint_https(tiny_dir, tmp_path):
    """The metrics endpoint of a server with a certificate speaks HTTPS: its printed URL had said http://."""
    import subprocess

    from live import self_signed_localhost

    from slicer_hf.launch import serve_command

    self_signed_localhost(tmp_path)
    tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"), "--metrics-port", "0"]
    command = serve_command(str(tiny_dir), tls)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        stop_server(proc)
    assert lines[0].startswith("metrics on https://127.0.0.1:") and lines[1].startswith("slicer-hf serving ")


def test_a_serving_process_leaves_what_it_built_out_of_the_collectors_passes(tiny_dir):
    """A full garbage collection walks every object a process holds (about 80 ms with a model loaded) in whichever
    thread sets it off, pausing every session's rounds: a serving process freezes what it built once it is built."""
    import subprocess
    import sys

    script = (
        "import gc\n"
        "from slicer_hf.server.build import load_server, settle_heap\n"
        f"server = load_server({str(tiny_dir)!r})\n"
        "settle_heap()\n"
        "walked = {id(o) for o in gc.get_objects()}\n"
        "print(sum(id(m) in walked for m in server.model.modules()), gc.get_freeze_count() > 0)\n"
        "server.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "True"], done.stderr


@pytest.mark.parametrize(
    "suite, option, value, refusal",
    [
        ("server_compute", "--repeats", "0", "must be at least 1, got 0"),  # was statistics' StatisticsError
        ("concurrency", "--clients", "0", "must be at least 1, got 0"),  # was a KeyError
        ("drift", "--bucket", "0", "must be at least 1, got 0"),  # was range()'s ValueError
        ("drift", "--prompts", "0", "must be at least 1, got 0"),  # was a table of NaN, exit 0
        ("soak", "--window-s", "0", "must be above 0, got 0"),  # was a ZeroDivisionError, after the soak
        ("prediction", "--alpha", "-1", "must be above 0, got -1"),  # was a singular matrix
        ("prediction", "--calib-tokens", "100", "must be at least 512, got 100"),  # was an empty torch.cat
        ("prediction", "--heldout-tokens", "100", "must be at least 512, got 100"),
        ("fleet", "--clients", "x", "expected an integer, got 'x'"),
        ("search", "--kl-tokens", "128", "must be at least 512, got 128"),  # was refused after the timed runs
    ],
)
def test_a_suites_bad_count_is_a_usage_error_before_it_runs(suite, option, value, refusal, capsys):
    import importlib

    with pytest.raises(SystemExit) as usage:
        importlib.import_module(f"slicer_hf.bench.{suite}").main([option, value])
    assert usage.value.code == 2 and refusal in capsys.readouterr().err


def test_the_summary_suite_outside_a_checkout_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    from slicer_hf.bench import summary

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as usage:
        summary.main(["--check"])
    assert usage.value.code == 2 and "run it from a slicer_hf checkout, or give --doc" in capsys.readouterr().err


def test_the_cli_prints_its_version():
    from typer.testing import CliRunner

    from slicer_hf import __version__
    from slicer_hf.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"slicer-hf {__version__}"
