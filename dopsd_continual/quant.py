"""8-bit storage of the frozen base weights during a round (`train.base_weights = "int8"`).

A round trains only LoRA adapters; the base transformer's Linear weights are read, never written. Stored
as int8 codes with one scale per output channel (symmetric, absmax / 127) they take 1 byte a weight instead
of 2 (bf16), which is what lets a 6B transformer train on a 24 GB card. Each use dequantises the weight into
the compute dtype; the backward pass dequantises again instead of keeping the dequantised copy, so the saved
activations do not bring the full-size weights back. Before the round ends the exact original weights are
put back (they wait in CPU memory meanwhile), so sampling, the gate and the stack never see quantised
weights; only the adapter is trained against them.

The price is precision: per-channel int8 moves each weight by at most half a step (absmax / 254), about
0.2-0.4% of a channel's largest weight. tests/test_quant.py pins the loss and gradient error on the
project's own step and checks the restore is bit-exact.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        return grad @ dequantize(q, scale, grad.dtype), None, None, None


class Int8Linear(nn.Linear):
    """A frozen nn.Linear whose weight lives as int8 codes (`qweight`) and per-row scales (`scale`).

    Still an nn.Linear, so peft wraps it with LoRA as it wraps any Linear; `weight` is the dequantised
    weight, computed when read.
    """

    qweight: torch.Tensor
    scale: torch.Tensor  # float32, one per output channel
    weight_dtype: torch.dtype  # the original weight's dtype

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize(self.qweight, self.scale, self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _Int8Linear.apply(x.to(dtype), self.qweight, self.scale, bias)


def frozen_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The base model's Linear layers: frozen, and not part of a LoRA adapter."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Linear and "lora_" not in n and not m.weight.requires_grad
    ]


@torch.no_grad()
def quantize_int8(model: nn.Module) -> dict[str, torch.Tensor]:
    """Store every frozen base Linear weight of `model` as int8; returns the originals (moved to the CPU),
    which `restore` puts back. A failure part way (out of memory, say) restores the layers already
    converted before it is raised: the model is never left half quantised."""
    originals: dict[str, torch.Tensor] = {}
    try:
        for name, m in frozen_linears(model):
            w = m.weight
            scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
            q = (w.float() / scale).round().clamp_(-127, 127).to(torch.int8)
            original = w.detach().to("cpu", copy=True)  # what can fail (memory) happens before the layer changes
            del m._parameters["weight"]
            m.__class__ = Int8Linear
            m.register_buffer("qweight", q, persistent=False)
            m.register_buffer("scale", scale, persistent=False)
            m.weight_dtype = w.dtype
            originals[name] = original
            del w
    except BaseException:
        restore(model, originals)
        raise
    return originals


@torch.no_grad()
def restore(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put the exact original weights back (the inverse of `quantize_int8`)."""
    modules = dict(model.named_modules())
    for name, w in originals.items():
        m = modules[name]
        if not isinstance(m, Int8Linear):
            raise RuntimeError(f"{name} is not a quantised layer")
        device = m.qweight.device
        del m._buffers["qweight"], m._buffers["scale"], m.weight_dtype
        m.__class__ = nn.Linear
        m.weight = nn.Parameter(w.to(device), requires_grad=False)


def storage_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (what its weights cost in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
