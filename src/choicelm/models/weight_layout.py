"""Decode-friendly weights: the same values, in the layout the one-token kernels read fastest.

Decoding multiplies one token's vector by every weight matrix: a matrix-vector product, bound by how
fast the kernel streams the matrix. torch's default CPU paths stream a weight for one row at well under
the memory bandwidth (nn.Linear's [out, in] fp32 weight at ~13 GB/s for GPT-2's output projection, on
this project's CPU; bf16 slower still). oneDNN with the weight prepacked into its blocked format (what
inductor's freezing pass does) streams it 1.5-2.5x faster, in fp32 and bf16 alike: GPT-2 124M decodes
1.2x faster at batch 1 and 1.8x at batch 8 in fp32 (benchmarks/generate_throughput.py).

    prepare_for_decoding(model)

gives every fp32/bf16 nn.Linear on CPU a prepacked oneDNN copy of its weight, used in inference (no_grad)
forwards; training forwards and other devices use the parameter as before. The copy costs the weight's
size again in memory and is rebuilt if the weight changes. Without oneDNN, fp32 weights are instead
re-stored as the transpose of a contiguous [in, out] tensor (same names, shapes and values; F.linear then
runs as mm over the [in, out] storage, ~1.5x faster for one row than over [out, in]). safetensors'
save_model refuses a tied pair of such non-contiguous weights: call restore_layout first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PackedLinear(nn.Linear):
    """nn.Linear whose no-grad CPU forward runs on a oneDNN-prepacked copy of the weight (fp32 or bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or x.dtype != w.dtype or x.device.type != "cpu":
            return F.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")

    def packed_weight(self) -> torch.Tensor:
        """The oneDNN-prepacked copy of the weight as it is now (repacked after an in-place change, a .to()
        or a load), for torch.ops.mkldnn._linear_pointwise."""
        w = self.weight
        key = (w.data_ptr(), w.dtype, w._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self._packed_key = key
        return self._packed


def _can_pack(w: torch.Tensor) -> bool:
    return (w.dtype in (torch.float32, torch.bfloat16) and w.device.type == "cpu"
            and torch.backends.mkldnn.is_available())


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
            for name in ("_packed", "_packed_key"):
                module.__dict__.pop(name, None)
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    return model
