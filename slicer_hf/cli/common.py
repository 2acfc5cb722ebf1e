"""What the commands share: the options several take, and their checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Causal LM: Hub id, local folder or 'smollm2' (embedded).")
]
PEM_FILE = {"exists": True, "dir_okay": False, "readable": True}  # checked before anything loads
RootCertOpt = Annotated[
    Path | None,
    typer.Option(help="PEM CA certificate to check a grpcs:// server's certificate against (private CA).", **PEM_FILE),
]


def read_root_cert(path: Path | None) -> bytes | None:
    """--root-cert's PEM bytes, refused here unless they hold a certificate."""
    if path is None:
        return None
    from ..errors import ConfigError
    from ..transport.base import root_context

    pem = path.read_bytes()
    try:
        root_context(pem)
    except ConfigError as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--root-cert") from None
    return pem


def torch_device(device: str) -> str:
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{device!r} is not a device (cpu, cuda, cuda:1)", param_hint="--device") from None
    return device


def on_this_machine(device: str) -> None:
    """Refuse a CUDA device this process's torch does not see (a fleet's replicas run on the cluster's nodes)."""
    import torch

    where = torch.device(device)
    if where.type == "cuda" and (where.index or 0) >= (held := torch.cuda.device_count()):
        raise typer.BadParameter(
            f"{device!r}: this torch sees {held} CUDA device{'s' * (held != 1)}"
            + (" (a CPU-only build, or no GPU here)" if not held else ""),
            param_hint="--device",
        )


def checked(make: Callable[..., T], **options: Any) -> T:
    """`make(**options)`, with a `ConfigError` shown as a bad command-line option (not a traceback)."""
    from ..errors import ConfigError

    try:
        return make(**options)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
