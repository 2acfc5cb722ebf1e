"""Triton kernels for the SLICER codec's hot path, installed as `slicer_hf._triton_kernels`.

The folder is `triton_kernels/` in the repository but is never installed under that name: Triton ships a
top-level package called `triton_kernels` of its own. The specification for every kernel is its pure-torch
reference in `slicer_hf.codec.ops`, and `ops` is the only caller (it decides when the kernels run).

Modules:
    select: ATKF selection and MS block labels, by radix select on exact sort keys (`ops.rank_order`).
    quant: ABQ block statistics, bitwidth choice and codes (`ops.choose_bits`, `ops.quantize`).
    pack: LSB-first packing and unpacking of variable-width fields (`ops.pack_bits`, `ops.unpack_bits`).
    dequant: decode's dequantize, sign and scatter (`ops.dequantize_rows`).
"""

import triton.language as tl

from . import select as _select
from .dequant import dequantize_rows
from .pack import pack_bits, unpack_bits
from .quant import quantize_selected
from .select import select_rows

__all__ = ["dequantize_rows", "interpreter_active", "pack_bits", "quantize_selected", "select_rows", "unpack_bits"]


def interpreter_active() -> bool:
    """Whether these kernels run under the Triton interpreter in this process.

    `TRITON_INTERPRET=1` works only when set before `triton` is first imported: Triton decorates its own `tl`
    helpers at import, and a kernel run by the interpreter calls them, so both must have been decorated for it.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_select._select_kernel, InterpretedFunction)
