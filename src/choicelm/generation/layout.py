"""Decode-friendly weights: the same values, in the layout the one-token kernels read fastest.

Decoding multiplies one token's vector by every weight matrix: a matrix-vector product, bound by how
fast the kernel streams the matrix. Measured on this project's CPU (DESIGN.md section 6, and
benchmarks/generate_throughput.py):

  fp32  nn.Linear keeps W as [out, in] and computes x @ W.T, which torch's BLAS path streams slowly for
        one row; the same product over a contiguous [in, out] matrix runs 1.4-1.6x faster. (Hugging Face
        GPT-2 gets that layout by accident: Conv1D stores [in, out].)
  bf16  torch's bf16 matrix-vector path is slow in either layout; oneDNN with the weight prepacked into
        its blocked format (what inductor's freezing pass does) is 1.5x faster at 1 row, 1.7x at 8, and
        gives bit-identical results.

    prepare_for_decoding(model)

re-stores every fp32 nn.Linear weight as the transpose of a contiguous [in, out] tensor (parameters keep
their names, shapes and values; F.linear on such a weight runs as mm over the [in, out] storage), and
gives every bf16 nn.Linear on CPU a prepacked oneDNN copy of its weight used in inference (no_grad)
forwards. That copy costs the weight's size again in memory; it is rebuilt if the weight changes.
A tied lm_head / wte pair is re-stored together; an embedding lookup in a strided row costs nothing.
safetensors' save_model refuses a tied pair of non-contiguous weights: call restore_layout first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PackedLinear(nn.Linear):
    """nn.Linear whose no-grad bf16 CPU forward runs on a oneDNN-prepacked copy of the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or x.dtype != w.dtype or x.device.type != "cpu":
            return F.linear(x, w, self.bias)
        if getattr(self, "_packed_version", None) != w._version:  # (re)pack after any in-place change
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self._packed_version = w._version
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def _can_pack(w: torch.Tensor) -> bool:
    return w.dtype == torch.bfloat16 and w.device.type == "cpu" and torch.backends.mkldnn.is_available()


@torch.no_grad()
def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Decode-friendly layout for every nn.Linear (in place; idempotent). Returns the model."""
    done: set[int] = set()
    for module in model.modules():
        if type(module) is nn.Linear and _can_pack(module.weight):
            module.__class__ = PackedLinear
            continue
        if not isinstance(module, nn.Linear) or isinstance(module, PackedLinear):
            continue
        w = module.weight
        if id(w) in done or w.dim() != 2 or not w.is_contiguous() or 1 in w.shape:
            continue
        w.data = w.data.t().contiguous().t()
        done.add(id(w))
    return model


@torch.no_grad()
def restore_layout(model: nn.Module) -> nn.Module:
    """Undo prepare_for_decoding: contiguous parameters, plain nn.Linear modules. Returns the model."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.__class__ = nn.Linear
            for name in ("_packed", "_packed_version"):
                module.__dict__.pop(name, None)
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    return model
