"""Linear weights packed once for oneDNN, for a server on the CPU.

torch's `Linear` runs its product with the default BLAS (MKL here) on the weight as stored. oneDNN instead holds a
weight in the blocked layout its JIT kernels read, arranged once at load, and at the few rows per weight of a decode
forward its kernels are faster: on the 2-core machine of docs/benchmarks.md (§7) the served layers of SmolLM2 run
their 42 products at 31 rows in 14 instead of 23 ms (packing the weights for MKL's own GEMM changes nothing there).
The product is the same, its sums rounded in another order (float32 outputs agree with `Linear`'s to about 1e-6 of
their scale).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can run packed weights of `dtype` on `device` (the CPU, float32 or a bfloat16 it supports)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """`nn.Linear` on a weight `[out, in]` packed for oneDNN. `weight` unpacks it, for code that inspects a layer's
    weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(blocks: Iterable[nn.Module]) -> int:
    """Replace every `nn.Linear` inside `blocks` (whose weights are on the CPU, in a dtype `packable` accepts) by a
    `PackedLinear`, in place; returns how many were replaced."""
    count = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and packable(child.weight.device, child.weight.dtype):
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
                    count += 1
    return count
