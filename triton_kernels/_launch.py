"""Launch settings shared by the kernels: bit-exact float options, warps, rows per program."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# Rows of a few thousand entries fit one program; the interpreter (CPU tests) runs programs one after another in
# Python, so there each program takes a taller tile of rows to keep the number of programs small.
GPU_TILE = 4096
INTERPRETER_TILE = 1 << 16
GPU_FLAT_BLOCK = 1024


def launch_options(block: int) -> dict[str, Any]:
    """Keyword options for a launch over blocks of `block` elements (the interpreter ignores them).

    `enable_fp_fusion=False`: a fused multiply-add rounds once where the torch reference rounds twice, so codes
    and decoded values would differ in the last bit.
    """
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return {"num_warps": warps, "enable_fp_fusion": False}


def rows_per_program(t: torch.Tensor, block: int) -> int:
    """How many rows one program handles (`block`, a row's padded width, is a power of two, so is the answer); a
    tensor on the CPU can only be running under the interpreter (`ops` dispatches CPU tensors to it alone)."""
    tile = INTERPRETER_TILE if t.device.type == "cpu" else GPU_TILE
    return max(1, tile // block)


def flat_block(t: torch.Tensor) -> int:
    """Elements per program for element-wise kernels over flat arrays."""
    return INTERPRETER_TILE if t.device.type == "cpu" else GPU_FLAT_BLOCK


def on_their_device(launch: F) -> F:
    """Run a kernel launcher with the GPU of its tensors current: Triton launches on the current device, so tensors
    on another (`cuda:1` while `cuda:0` is current) would be refused, or read from the wrong GPU's stream."""

    @functools.wraps(launch)
    def launched(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        guard = torch.cuda.device(first.device) if first.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launch(first, *args, **kwargs)

    return launched  # type: ignore[return-value]
