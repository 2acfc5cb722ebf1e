"""LSB-first packing of variable-width fields (0..32 bits) into bytes, and back.

Reference: `slicer_hf.codec.ops.pack_bits` / `ops.unpack_bits` (the bitstream of `bits.BitWriter` / `BitReader`).

Field i starts at bit `bit_offset + sum(widths[:i])` (a torch cumsum). Packing ORs each field into the one or two
32-bit little-endian words it touches with atomics (OR commutes, so the bytes do not depend on the order);
unpacking reads those two words back. Integer-only, so the bytes and codes are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import flat_block, launch_options, on_their_device

LOW32 = tl.constexpr(0xFFFFFFFF)


@triton.jit(do_not_specialize=["n"])
def _pack_kernel(code_ptr, width_ptr, start_ptr, word_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    width = tl.load(width_ptr + i, mask=ok, other=0)
    code = tl.load(code_ptr + i, mask=ok, other=0) & ((tl.full([BLOCK], 1, tl.int64) << width) - 1)
    start = tl.load(start_ptr + i, mask=ok, other=0)
    word = start >> 5
    shifted = code << (start & 31)  # < 2^63: a field of <= 32 bits moved by < 32
    low = (shifted & LOW32).to(tl.uint32).to(tl.int32, bitcast=True)
    high = (shifted >> 32).to(tl.uint32).to(tl.int32, bitcast=True)
    tl.atomic_or(word_ptr + word, low, mask=ok & (width > 0), sem="relaxed")
    tl.atomic_or(word_ptr + word + 1, high, mask=ok & (high != 0), sem="relaxed")


@triton.jit(do_not_specialize=["n", "n_words"])
def _unpack_kernel(word_ptr, width_ptr, start_ptr, code_ptr, n, n_words, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    width = tl.load(width_ptr + i, mask=ok, other=0)
    start = tl.load(start_ptr + i, mask=ok, other=0)
    word = start >> 5
    live = ok & (width > 0)
    low = tl.load(word_ptr + word, mask=live, other=0).to(tl.int64) & LOW32
    high = tl.load(word_ptr + word + 1, mask=live & (word + 1 < n_words), other=0).to(tl.int64) & LOW32
    shift = start & 31
    joined = (low >> shift) | (high << (32 - shift))  # bits above 32 may wrap; the mask drops them
    code = joined & ((tl.full([BLOCK], 1, tl.int64) << width) - 1)
    tl.store(code_ptr + i, code, mask=ok)


def _starts(widths: torch.Tensor, bit_offset: int) -> torch.Tensor:
    return bit_offset + torch.cumsum(widths, 0) - widths


@on_their_device
def pack_bits(codes: torch.Tensor, widths: torch.Tensor, bit_offset: int) -> torch.Tensor:
    """uint8 `[ceil((bit_offset + sum(widths)) / 8)]`: `codes[i]` in `widths[i]` bits after `bit_offset` zero bits."""
    codes = codes.to(torch.int64).contiguous()
    widths = widths.to(torch.int64).contiguous()
    total = bit_offset + int(widths.sum())
    n_words = triton.cdiv(total, 32) + 1  # one spare word: a field's high half may land past the last byte
    words = torch.zeros(n_words, dtype=torch.int32, device=codes.device)
    block = flat_block(codes)
    _pack_kernel[(triton.cdiv(codes.numel(), block),)](
        codes, widths, _starts(widths, bit_offset), words, codes.numel(), BLOCK=block, **launch_options(block)
    )
    return words.view(torch.uint8)[: triton.cdiv(total, 8)]


@on_their_device
def unpack_bits(data: torch.Tensor, widths: torch.Tensor, bit_offset: int) -> torch.Tensor:
    """int64 codes of `widths[i]` bits read from uint8 `data` from bit `bit_offset` (bounds checked by the caller)."""
    widths = widths.to(torch.int64).contiguous()
    n_words = triton.cdiv(data.numel(), 4)
    words = torch.zeros(n_words * 4, dtype=torch.uint8, device=data.device)
    words[: data.numel()] = data
    codes = torch.empty(widths.numel(), dtype=torch.int64, device=data.device)
    block = flat_block(widths)
    _unpack_kernel[(triton.cdiv(widths.numel(), block),)](
        words.view(torch.int32),
        widths,
        _starts(widths, bit_offset),
        codes,
        widths.numel(),
        n_words,
        BLOCK=block,
        **launch_options(block),
    )
    return codes
