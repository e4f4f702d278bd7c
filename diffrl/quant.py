"""Low-precision exploration (Sol-RL, arXiv 2604.06916); layer L1, pure torch (torchao is imported lazily).

Emulated FP8 (e4m3) and FP4 (e2m1: NVFP4 with 16-element blocks and e4m3 block scales, MXFP4 with 32-element blocks
and power-of-two scales) round trips, a linear layer that computes on those grids, the choice between the emulated
and the native (torchao, GPU) path. Which candidates to keep is ``diffrl.selection``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_MAX = 448.0
"""Largest finite float8 e4m3fn value."""
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The non-negative float4 e2m1 values (tests check ``fp4_round`` against them)."""
FP4_MAX = 6.0
FORMATS = ("fp8", "fp8_tensor", "nvfp4", "mxfp4")


def _safe_scale(amax: Tensor, top: float) -> Tensor:
    """``amax / top`` where amax > 0, else 1 (an all-zero row or block quantizes to zeros)."""
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def fp8_round_trip(x: Tensor, per_row: bool = True) -> Tensor:
    """``x`` through float8 e4m3 and back, with a dynamic scale (amax / 448) per row (the last dim) or per tensor.

    Shape and dtype of ``x`` are kept; the arithmetic is fp32. Relative error of a value whose scaled magnitude is
    a normal e4m3 number (>= 2^-6) is at most 2^-4 (3 mantissa bits, round to nearest even).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_row else xf.abs().amax()
    scale = _safe_scale(amax, FP8_MAX)
    return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def fp4_round(x: Tensor) -> Tensor:
    """Round to the nearest float4 e2m1 value (ties to the even code), saturating at +-6. fp32 in, fp32 out.

    e2m1 keeps one mantissa bit: in the binade [2^e, 2^(e+1)) (e >= 0) the spacing is 2^(e-1), below 1 (subnormals)
    it is 0.5, so rounding is ``round_half_even(|x| / spacing) * spacing``.
    """
    mag = x.abs().clamp(max=FP4_MAX)
    spacing = torch.where(mag >= 1, torch.exp2(torch.floor(torch.log2(mag.clamp_min(1))) - 1),
                          torch.full_like(mag, 0.5))
    return torch.copysign(torch.round(mag / spacing) * spacing, x)


def _blocks(x: Tensor, block: int) -> tuple[Tensor, int]:
    """``[..., n]`` -> ``[..., ceil(n / block), block]`` (zero-padded) and the padding."""
    pad = (-x.shape[-1]) % block
    xp = F.pad(x, (0, pad)) if pad else x
    return xp.reshape(*x.shape[:-1], -1, block), pad


def _unblock(xb: Tensor, pad: int) -> Tensor:
    x = xb.flatten(-2)
    return x[..., : x.shape[-1] - pad] if pad else x


def nvfp4_round_trip(x: Tensor, block: int = 16) -> Tensor:
    """``x`` through NVFP4 and back: blocks of ``block`` elements along the last dim, each with an e4m3 block
    scale (amax_block / 6, stored relative to one fp32 per-tensor scale amax / (448 * 6)), values on the e2m1 grid."""
    xf = x.float()
    xb, pad = _blocks(xf, block)
    global_scale = _safe_scale(xf.abs().amax(), FP8_MAX * FP4_MAX)
    block_scale = (xb.abs().amax(dim=-1, keepdim=True) / FP4_MAX / global_scale).to(torch.float8_e4m3fn).float()
    scale = torch.where(block_scale > 0, block_scale * global_scale, torch.ones_like(block_scale))
    return _unblock(fp4_round(xb / scale) * scale, pad).to(x.dtype)


def mxfp4_round_trip(x: Tensor, block: int = 32) -> Tensor:
    """``x`` through MXFP4 and back (OCP MX): blocks of ``block`` elements along the last dim share a power-of-two
    scale 2^(floor(log2 amax_block) - 2) (e8m0; 2 is e2m1's largest exponent), values on the e2m1 grid, saturating."""
    xf = x.float()
    xb, pad = _blocks(xf, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2), torch.ones_like(amax))
    return _unblock(fp4_round(xb / scale) * scale, pad).to(x.dtype)


def round_trip(x: Tensor, fmt: str) -> Tensor:
    """``x`` through ``fmt`` and back, weights and activations alike: fp8 (per-row scales on the last dim),
    fp8_tensor (one scale per tensor), nvfp4 or mxfp4 (blocks along the last dim)."""
    if fmt in ("fp8", "fp8_tensor"):
        return fp8_round_trip(x, per_row=fmt == "fp8")
    if fmt == "nvfp4":
        return nvfp4_round_trip(x)
    if fmt == "mxfp4":
        return mxfp4_round_trip(x)
    raise ValueError(f"unknown low-precision format {fmt!r}; choose one of {FORMATS}")


class EmulatedLowPrecisionLinear(nn.Module):
    """A linear layer computed on the ``fmt`` grid in high precision: the weight is stored already round-tripped
    (per output row), each input is round-tripped dynamically (per token), then ``F.linear`` in the weight's dtype.
    This is what an FP8/FP4 GEMM computes, up to the accumulation order."""

    def __init__(self, linear: nn.Linear, fmt: str):
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", round_trip(linear.weight.detach(), fmt))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Re-quantize from a new high-precision weight ``[out, in]`` (the policy after an update)."""
        self.weight.copy_(round_trip(weight.to(self.weight.dtype), self.fmt))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(round_trip(x, self.fmt), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


def quantizable(name: str, module: nn.Module, skip: Sequence[str] = (), min_dim: int = 0) -> bool:
    """Whether a linear layer goes low-precision: its qualified name contains none of ``skip`` and
    max(d_in, d_out) > ``min_dim`` (Sol-RL's ``nvfp4_skip_modules`` and ``nvfp4_min_dim``)."""
    return (isinstance(module, nn.Linear) and not any(s in name for s in skip)
            and max(module.in_features, module.out_features) > min_dim)


def emulate_low_precision(model: nn.Module, fmt: str, skip: Sequence[str] = (), min_dim: int = 0) -> list[str]:
    """Replace, in place, every quantizable ``nn.Linear`` of ``model`` by an ``EmulatedLowPrecisionLinear``;
    returns the qualified names replaced (everything else stays in high precision)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown low-precision format {fmt!r}; choose one of {FORMATS}")
    names = [n for n, m in model.named_modules() if quantizable(n, m, skip, min_dim)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, EmulatedLowPrecisionLinear(getattr(owner, child), fmt))
    return names


def choose_path(fmt: str, backend: str, device: str, capability: Optional[tuple[int, int]],
                torchao_available: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[str, str]:
    """Which implementation runs the exploration copy, and why: ``("native", reason)`` (torchao low-precision GEMMs)
    or ``("emulated", reason)``. backend: ``auto`` (native where the hardware and torchao allow it), ``emulated`` or
    ``native`` (an error where it cannot run). capability: the CUDA compute capability, None without a GPU. dtype:
    the model's weights dtype. FP8 GEMMs need compute capability 8.9+ (Ada, Hopper); FP4 ones 10.0+ (Blackwell);
    torchao's dynamic-activation kernels (per-row FP8 scaling among them) take bfloat16 models."""
    need = (8, 9) if fmt.startswith("fp8") else (10, 0)
    if backend == "emulated":
        return "emulated", "requested (explore.backend: emulated)"
    if not device.startswith("cuda") or capability is None:
        why = f"no CUDA device (model.device is {device!r}): {fmt} is emulated on the grid in fp32/bf16"
    elif capability < need:
        why = (f"{fmt} GEMMs need compute capability {need[0]}.{need[1]}+, this GPU has "
               f"{capability[0]}.{capability[1]}: {fmt} is emulated")
    elif not torchao_available:
        why = f"torchao is not installed (pip install 'diffrl[quant]'): {fmt} is emulated"
    elif dtype != torch.bfloat16:
        why = (f"torchao's {fmt} GEMMs take bfloat16 models and model.dtype is {str(dtype).removeprefix('torch.')} "
               f"(set model.dtype: bfloat16): {fmt} is emulated")
    else:
        return "native", f"torchao {fmt} on compute capability {capability[0]}.{capability[1]}"
    if backend == "native":
        raise ValueError(f"explore.backend native cannot run here: {why.split(':')[0]}")
    return "emulated", why
