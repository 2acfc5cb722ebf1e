"""`slicer-hf demo`, `generate` and `chat`: split generation from this process."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .common import ModelOpt, RootCertOpt, checked, read_root_cert


def demo(
    model: ModelOpt = "smollm2",
    prompt: Annotated[str, typer.Option(help="What to ask the model.")] = "What is the capital of France?",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", min=1)] = 32,
    config: Annotated[
        str | None,
        typer.Option(
            help="SlicerConfig folder or preset name (configs/); default: the model folder's own slicer_config.json, "
            "else the SmolLM2 preset for SmolLM2, else SlicerConfig's defaults."
        ),
    ] = None,
    split_layer: Annotated[int | None, typer.Option(help="Override the config's split layer.")] = None,
) -> None:
    """Start a server process, split-generate against it from this process, and show what crossed the wire."""
    from ..demo import run_demo

    run_demo(model=model, prompt=prompt, max_new_tokens=max_new_tokens, config=config, split_layer=split_layer)


ServerOpt = Annotated[
    list[str],
    typer.Option(
        "--server",
        "-s",
        help="Server URL (grpc://host:port, grpcs://host:port, or a fleet's slicer+http(s)://host:port); repeat for "
        "failover.",
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="SlicerConfig: preset name, folder or Hub repo (default: the model folder's own slicer_config.json; "
        "else the SmolLM2 preset for SmolLM2, by alias, Hub id or converted folder; else SlicerConfig's defaults)."
    ),
]
SplitLayerOpt = Annotated[
    int | None, typer.Option(help="Override the config's split layer (at least the server's --min-split-layer).")
]
DoSampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample instead of greedy.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option(help="Sample from the k most likely tokens.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling.")]
ServerTokenOpt = Annotated[str | None, typer.Option(envvar="SLICER_HF_TOKEN", help="The servers' auth token.")]
TimeoutOpt = Annotated[
    float, typer.Option(help="How long one request waits for its reply, seconds (a busy server's included).", min=0.001)
]


def _sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int | None):
    options = locals()
    from ..client import Sampling

    return checked(Sampling, **options)  # a bad combination (temperature 0 with sampling) is a usage error


def generate(
    server: ServerOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask.")],
    model: ModelOpt = "smollm2",
    config: ConfigOpt = None,
    split_layer: SplitLayerOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.", min=1)] = 128,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 50,
    seed: SeedOpt = None,
    token: ServerTokenOpt = None,
    root_cert: RootCertOpt = None,
    timeout_s: TimeoutOpt = 60.0,
) -> None:
    """Split-generate against a running server: the reply streams as it comes, wire stats at the end."""
    from ..client import Client

    sampling = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    client = Client(server, model, config, token, read_root_cert(root_cert), timeout_s, split_layer)
    _, elapsed, new = client.reply([{"role": "user", "content": prompt}], sampling)
    print("\n" + client.summary(elapsed, new))
    client.close()


def chat(
    server: ServerOpt,
    model: ModelOpt = "smollm2",
    config: ConfigOpt = None,
    split_layer: SplitLayerOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply at most.", min=1)] = 256,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 50,
    seed: SeedOpt = None,
    token: ServerTokenOpt = None,
    root_cert: RootCertOpt = None,
    timeout_s: TimeoutOpt = 60.0,
) -> None:
    """Chat with a split model on a running server (one line per turn; /exit or end of input to leave).

    Ctrl-C stops a reply and drops its turn; at the prompt, it leaves. A turn the server refuses, or whose reply times
    out, is dropped too; a refused token or no server at all ends the chat."""
    from ..client import Client
    from ..errors import ConfigError, ProtocolError, TransportError

    sampling = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    client = Client(server, model, config, token, read_root_cert(root_cert), timeout_s, split_layer)
    messages: list[dict[str, str]] = []
    total_s, total_new = 0.0, 0
    print("chat with the split model (/exit to leave; Ctrl-C stops a reply)", flush=True)
    try:
        for line in sys.stdin:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if not text:
                continue
            messages.append({"role": "user", "content": text})
            try:
                reply, elapsed, new = client.reply(messages, sampling)
            except (ProtocolError, ConfigError, TransportError) as exc:  # the server refused this turn (it outgrew
                if isinstance(exc, TransportError) and not exc.timed_out:  # the context, say), or gave no reply in
                    raise  # time: the conversation goes on; a refused token or no server at all ends it
                messages.pop()
                if isinstance(exc, TransportError):
                    client.restart()  # its session is gone with its stream
                print(f"\nerror: {exc} (this message is dropped; /exit to leave)", flush=True)
                continue
            except KeyboardInterrupt:  # stops this reply, not the chat
                messages.pop()
                client.restart()
                print("\n(stopped: this message is dropped; /exit to leave)", flush=True)
                continue
            messages.append({"role": "assistant", "content": reply})
            total_s, total_new = total_s + elapsed, total_new + new
    except KeyboardInterrupt:  # at the prompt: leave as /exit does
        pass
    print("\n" + client.summary(total_s, total_new))
    client.close()
