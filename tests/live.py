"""Helpers for tests against live `slicer-hf serve` processes on loopback (the `server` fixture is in conftest)."""

from __future__ import annotations

import signal
import threading
import time

import torch
from conftest import VOCAB
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.generation.streamers import BaseStreamer

from slicer_hf import SlicerConfig, SlicerModelForCausalLM, build_codec, protocol
from slicer_hf.codec.bits import write_varint
from slicer_hf.data import default_model_path
from slicer_hf.launch import start_server
from slicer_hf.transport.grpc import STATS_METHOD, GrpcTransport

LOSSLESS = SlicerConfig(codec="identity", split_layer=2)


class Server:
    """A `slicer-hf serve` process for `model_dir`, with quiet logs and one torch thread."""

    def __init__(self, model_dir, *args, port=0):
        self.model_dir, self.args = model_dir, list(args)
        self.proc, self.url = start_server(
            model_dir, ["--log-level", "warning", "--threads", "1", *self.args, "--port", str(port)]
        )
        self.port = int(self.url.rsplit(":", 1)[1])

    def stats(self, token=None):
        return protocol.decode_json(GrpcTransport([self.url], token=token, timeout_s=10).unary(STATS_METHOD))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def client(model_dir, url, config=LOSSLESS, **options):
    return SlicerModelForCausalLM.from_pretrained(
        model_dir, slicer_config=config, transport=url, transport_options=options or None
    )


def raw_open(transport: GrpcTransport, model_dir: str, **fields) -> int:
    """OPEN on a raw stream with the tiny model's fingerprint; returns the session id."""
    from transformers import AutoConfig

    body = {
        "fingerprint": protocol.model_fingerprint(AutoConfig.from_pretrained(model_dir)),
        "split_layer": 2,
        "codec": build_codec("identity").spec(),
        **fields,
    }
    reply = transport.request(protocol.encode_json(protocol.OPEN, body))
    protocol.raise_if_error(reply)
    return int(protocol.decode_json(reply)["session"])


def step_header(session: int, seq: int, start: int, batch: int, tokens: int, flags: int = 0) -> bytes:
    fields = (session, seq, start, batch, tokens)
    return protocol.header(protocol.STEP) + b"".join(map(write_varint, fields)) + bytes([flags]) + write_varint(0)


def prompt(seed, length=6):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def wait_for(condition, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


class CallbackStreamer(BaseStreamer):
    """Runs `action` once, after `after` generated tokens."""

    def __init__(self, after, action):
        self.after, self.action, self.seen = after, action, -1

    def put(self, value):
        self.seen += 1
        if self.seen == self.after:
            self.action()

    def end(self):
        pass


def tiny_smol_dir(path, preset: SlicerConfig):
    """A 4-layer random Llama with SmolLM2's tokenizer (and chat template) in `path`, `preset` in `path/preset`."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    preset.save_pretrained(path / "preset")
    return path


def gate_rounds(server) -> tuple[threading.Event, threading.Event, list[int]]:
    """Make the scheduler's rounds wait for `release` (a long forward); `stuck` is set once one is waiting."""
    stuck, release, ran = threading.Event(), threading.Event(), []
    plain = server.scheduler._round

    def gated(pending):
        ran.append(len(pending))
        stuck.set()
        release.wait(10)
        return plain(pending)

    server.scheduler._round = gated
    return stuck, release, ran


def self_signed_localhost(folder):
    """A self-signed certificate for `localhost` (cert.pem, key.pem in `folder`); returns the certificate PEM."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_pem
