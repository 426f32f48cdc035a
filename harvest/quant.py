"""Storage formats of activation rows (SPEC.md "Formats"): how a row of D float values becomes the stored bits, how
the bits become floats again, and the error that costs.

- `float32`, `float16`: stored natively. `bfloat16`: its raw bits as uint16 (zarr has no bf16).
- `int8`: per row, a float32 scale = absmax / 127 and D int8 codes = round(x / scale); x̂ = code · scale.
- `nf4`: per row, a float32 scale = absmax and D 4-bit codes (two per byte, low nibble first) indexing the 16 NF4
  levels (normal quantiles on [-1, 1] with an exact 0, as in QLoRA); x̂ = level[code] · scale.

The quantized formats store one uint8 array row per activation row: the 4 bytes of the little-endian float32 scale,
then the codes. A row's scale thus travels with its codes through every read path (loader runs, shard cache, copy),
and the dequantization is one line of numpy (SPEC.md). numcodecs' lossy filters were checked first: `Quantize` and
`BitRound` round mantissa digits but keep a float per value (their size then depends on the compressor), and
`FixedScaleOffset` has one scale for the whole array, where activation rows differ in norm by orders of magnitude.

Non-finite values (the harvest's `nonfinite` policy decides whether they are stored): a quantized row holding any
NaN/Inf is stored with a NaN scale and all-zero codes, so the whole row decodes as NaN and is counted.

Encoding runs in torch on the model's device, before the copy to host (a quarter or a half of the bytes to move).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
import torch

SCALE_BYTES = 4  # the float32 row scale that leads every quantized row


@dataclass(frozen=True)
class Format:
    """One storage format: the zarr dtype of the `acts/*` arrays and how many stored columns a row of D values has."""

    name: str
    zarr_dtype: str
    """dtype of the stored array (bf16 and the quantized formats are stored as unsigned integer bits)."""
    bits: int
    """Bits per activation value of the codes (the per-row scale comes on top for quantized formats)."""
    quantized: bool = False

    def width(self, d: int) -> int:
        """Stored columns of a row of ``d`` values."""
        if self.name == "int8":
            return SCALE_BYTES + d
        if self.name == "nf4":
            return SCALE_BYTES + (d + 1) // 2
        return d

    def bound(self, absmax: float) -> float:
        """Documented bound of |x - x̂| for a finite row of largest magnitude ``absmax`` (quantized formats): half a
        step (absmax/254 for int8, absmax × the widest NF4 gap / 2 = 0.139 absmax for nf4), widened by 2^-12 for the
        float32 rounding of x / scale, of the scale and of the product, plus 128 subnormal units."""
        if self.name == "int8":
            return absmax / 254 * (1 + 2**-12) + 128 * 2.0**-149
        if self.name == "nf4":
            return absmax * float(np.diff(nf4_levels()).max()) / 2 * (1 + 2**-12) + 128 * 2.0**-149
        raise ValueError(f"{self.name} is not quantized")


FORMATS = {
    "float16": Format("float16", "float16", 16),
    "bfloat16": Format("bfloat16", "uint16", 16),
    "float32": Format("float32", "float32", 32),
    "int8": Format("int8", "uint8", 8, quantized=True),
    "nf4": Format("nf4", "uint8", 4, quantized=True),
}


@lru_cache(maxsize=None)
def nf4_levels() -> tuple[float, ...]:
    """The 16 NF4 levels: 8 positive and 7 negative quantiles of N(0, 1) between probabilities 0.5 and
    δ = (1 - 1/32 + 1 - 1/30) / 2, each side scaled to end at ±1, plus an exact 0 (Dettmers et al. 2023)."""
    nd, delta = NormalDist(), 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))
    pos = [nd.inv_cdf(0.5 + (delta - 0.5) * i / 8) for i in range(1, 9)]
    neg = [nd.inv_cdf(0.5 + (delta - 0.5) * i / 7) for i in range(1, 8)]
    levels = [-v / neg[-1] for v in reversed(neg)] + [0.0] + [v / pos[-1] for v in pos]
    return tuple(float(np.float32(v)) for v in levels)


@lru_cache(maxsize=None)
def _nf4_pairs() -> np.ndarray:
    """[256] uint64: the two float32 levels a packed byte holds (low nibble first) as one 8-byte word, so decoding is
    one `take` per byte (a gather of [256, 2] floats by byte measured 6x slower)."""
    lv = np.asarray(nf4_levels(), dtype=np.float32)
    b = np.arange(256)
    return np.ascontiguousarray(np.stack([lv[b & 15], lv[b >> 4]], 1)).view(np.uint64).ravel()


def get(name: str) -> Format:
    return FORMATS[name]


# ------------------------------------------------------------------------------------------------------------ encode


def encode(x_ND: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rows ``[N, D]`` (any float dtype, any device) → the stored bits on the same device: ``[N, width]`` in the
    format's zarr dtype (as the torch dtype of the same width)."""
    if fmt == "float32":
        return x_ND.float()
    if fmt == "float16":
        return x_ND.to(torch.float16)
    if fmt == "bfloat16":
        return x_ND.to(torch.bfloat16).view(torch.int16)
    x = x_ND.float()
    n, d = x.shape
    finite_N = torch.isfinite(x).all(1)
    x = torch.where(finite_N[:, None], x, 0.0)
    absmax_N = x.abs().amax(1) if d else torch.zeros(n, device=x.device)
    if fmt == "int8":
        scale_N = absmax_N / 127
        q = torch.round(x / torch.where(scale_N > 0, scale_N, 1.0)[:, None]).clamp_(-127, 127)
        codes = q.to(torch.int8).view(torch.uint8)
    elif fmt == "nf4":
        scale_N = absmax_N
        lv = torch.tensor(nf4_levels(), device=x.device)
        y = x / torch.where(scale_N > 0, scale_N, 1.0)[:, None]
        c = torch.bucketize(y, (lv[1:] + lv[:-1]) / 2).to(torch.uint8)  # nearest level
        if d % 2:
            c = torch.cat([c, torch.zeros(n, 1, dtype=torch.uint8, device=c.device)], 1)
        codes = c[:, 0::2] | (c[:, 1::2] << 4)
    else:
        raise ValueError(f"unknown storage format {fmt!r}")
    scale_N = torch.where(finite_N, scale_N, float("nan"))
    return torch.cat([scale_N.contiguous().view(torch.uint8).view(n, SCALE_BYTES), codes], 1)


def to_numpy(stored: torch.Tensor, fmt: str) -> np.ndarray:
    """Stored bits (any device) → the host numpy array written to zarr."""
    a = stored.cpu().numpy()
    return a.view(np.dtype(FORMATS[fmt].zarr_dtype))


# ------------------------------------------------------------------------------------------------------------ decode


def decode(a: np.ndarray, fmt: str, d: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Stored rows (numpy, the zarr dtype or any same-width integer view) → ``[N, d]`` torch ``dtype``, on this thread.

    float formats convert bit-exactly (a zero-copy view when no cast is needed; ``dtype`` None keeps their own);
    quantized ones dequantize in float32, as SPEC.md's numpy lines do, and then cast."""
    f = FORMATS[fmt]
    if not f.quantized:
        a = np.ascontiguousarray(a)
        src = torch.from_numpy(a.view(np.dtype(f.zarr_dtype)) if fmt != "bfloat16" else a.view(np.int16))
        if fmt == "bfloat16":
            src = src.view(torch.bfloat16)
        return src if dtype is None or src.dtype == dtype else src.to(dtype)
    a = a.view(np.uint8)
    scale = torch.from_numpy(np.ascontiguousarray(a[:, :SCALE_BYTES]).view("<f4"))  # [N, 1]
    if fmt == "int8":  # torch's int8 -> float32 conversion then an in-place scale: the fastest of those measured
        t = torch.from_numpy(a).narrow(1, SCALE_BYTES, a.shape[1] - SCALE_BYTES).view(torch.int8).to(torch.float32)
    else:
        t = torch.from_numpy(_nf4_pairs().take(a[:, SCALE_BYTES:]).view(np.float32))
        if t.shape[1] != d:
            t = t[:, :d]
    t.mul_(scale)
    return t if dtype in (None, torch.float32) else t.to(dtype)


def decode_torch(stored: torch.Tensor, fmt: str, d: int) -> torch.Tensor:
    """Stored bits as produced by `encode` (any device) → float32 ``[N, d]`` on the same device."""
    if fmt == "float32":
        return stored
    if fmt == "float16":
        return stored.float()
    if fmt == "bfloat16":
        return stored.view(torch.bfloat16).float()
    n = stored.shape[0]
    scale = stored[:, :SCALE_BYTES].contiguous().view(torch.float32)  # [N, 1]
    body = stored[:, SCALE_BYTES:]
    if fmt == "int8":
        return body.view(torch.int8).float() * scale
    lv = torch.tensor(nf4_levels(), device=stored.device)
    c = torch.stack([body & 15, body >> 4], 2).reshape(n, -1)[:, :d]
    return lv[c.long()] * scale


def error_sums(x_ND: torch.Tensor, stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """float64 [3] on the device: (Σ‖x - x̂‖², Σ‖x‖², non-finite values of x̂) over the rows, non-finite entries left
    out of the sums. Relative MSE of a hook = Σ‖x - x̂‖² / Σ‖x‖² (SPEC.md "Manifest")."""
    return stored_sums(x_ND, stored, fmt)[:3]


def stored_sums(x_ND: torch.Tensor, stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """float64 [4 + D] on the device, everything a shard's manifest entry records of a block of rows, from one decode:
    `error_sums`' three, then Σ‖x̂‖² and Σ_rows x̂ [D] of the stored values (`row_sums`). Blocks add up to the shard's
    sums; the harvest takes them on the model's device, so the host's threads only encode and write."""
    x = x_ND.double()
    xh = decode_torch(stored, fmt, x_ND.shape[1]).double()
    ok = torch.isfinite(x) & torch.isfinite(xh)
    err = torch.where(ok, x - xh, 0.0)
    head = torch.stack([(err * err).sum(), torch.where(ok, x * x, 0.0).sum()])
    return torch.cat([head, row_sums(xh)])


def row_sums(xh_ND: torch.Tensor) -> torch.Tensor:
    """float64 [2 + D] of decoded stored rows (any float dtype, any device): (non-finite values, Σ‖x̂‖², Σ_rows x̂ [D]),
    non-finite values counted and left out of the sums. A shard's statistics (SPEC.md "Manifest") are these, summed
    over its rows in any blocking."""
    x = xh_ND.double()
    ok = torch.isfinite(x)
    x = torch.where(ok, x, 0.0)
    return torch.cat([torch.stack([(~ok).sum().double(), (x * x).sum()]), x.sum(0)])


def stats_from_sums(sums: list[float], count: int) -> dict:
    """A manifest entry's statistics of one hook from `row_sums` (or the tail of `stored_sums`) as a list."""
    return {"count": count, "sum": [float(v) for v in sums[2:]], "sum_sq_norm": float(sums[1]),
            "nonfinite": int(sums[0])}
