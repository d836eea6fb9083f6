"""Quantised weights for the fast base graph: 8-bit rows, and the GGUF's own 4-bit blocks.

Three weight sets name what the fast graph multiplies by (`WEIGHTS`):

    fp32   the model's own weights (for the embedded base: the GGUF de-quantised), the reference
    int8   every projection rounded to 8 bits per output channel (`int8_channels`), multiplied by
           ONNX Runtime's integer GEMM (`com.microsoft.DynamicQuantizeMatMul`) with the activations
           rounded to 8 bits per row (fast_graph.py says how); works for any base
    q4     the GGUF's Q4_1 blocks, for `com.microsoft.MatMulNBits`, which stores a weight in blocks of
           32 along the input dimension K, each as `w = scale * (q - zero_point)` with integer q and
           zero point. Q4_1 stores `w = d * q + m` (4-bit q, an fp16 scale d and an fp16 minimum m per
           block). MatMulNBits' fast kernels want an integer zero point, and -m/d is rarely an
           integer, so each block is written again on a 4-bit grid (`q4_from_q4_1`): the better of
           keeping d and q with the zero point rounded, or rounding the block afresh. Tensors the GGUF
           keeps in another type follow the file: SmolLM2's token table is Q8_0 (`w = d * q`, 8-bit
           q), held exactly as 8-bit blocks with zero point 128.

Why two kernels: both round the activations to int8, but on two CPU cores MatMulNBits' cost grows
steeply with the rows of a pass (8 rows cost 2.5-4x one), while the integer GEMM's barely does
(docs/quantised.md). The 4-bit weights exist only for MatMulNBits.

Both quantised sets keep the token table in fp32 for the embedding lookup (one row read a token) and
multiply the tied output head by its quantised weights.

    channels = int8_channels(w)                 # w: (N, K) float32 -> Channels
    tensors = read_gguf_blocks(path)            # name -> (type name, raw blocks)
    error = weight_error(channels, w)           # max |dw| and ||dw|| / ||w||
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medusa_lib.config import WEIGHTS  # "fp32", "int8", "q4"

BLOCK = 32  # weights per block along K (GGUF's Q4_1/Q8_0 block, and MatMulNBits' block_size here)
ACCURACY_LEVEL = 4  # MatMulNBits rounds the activations to int8 per block: its fast CPU kernels. Level 1 (fp32
# activations) keeps one-token passes fast but makes a pass of 2+ tokens cost what fp32 does (measured, docs/quantised.md)
GGUF_Q4_1, GGUF_Q8_0 = "Q4_1", "Q8_0"


@dataclass
class Blocks:
    """One (N, K) weight matrix in MatMulNBits' layout: N output rows, K inputs in blocks of BLOCK."""
    bits: int
    packed: np.ndarray  # uint8 (N, K/BLOCK, BLOCK*bits/8): for 4 bits, element 2j in the low nibble of byte j
    scales: np.ndarray  # float32 (N, K/BLOCK)
    zero_points: np.ndarray  # uint8 (N, ceil(K/BLOCK * bits/8)), packed like the weights

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * BLOCK

    def values(self) -> np.ndarray:
        """The integer q of every weight, (N, K/BLOCK, BLOCK) uint8."""
        if self.bits == 8:
            return self.packed
        lo, hi = self.packed & 0x0F, self.packed >> 4
        return np.stack([lo, hi], -1).reshape(*self.packed.shape[:2], BLOCK)

    def zeros(self) -> np.ndarray:
        """The zero point of every block, (N, K/BLOCK) uint8."""
        kb = self.packed.shape[1]
        if self.bits == 8:
            return self.zero_points[:, :kb]
        return np.stack([self.zero_points & 0x0F, self.zero_points >> 4], -1).reshape(len(self.zero_points), -1)[:, :kb]

    def dequantize(self) -> np.ndarray:
        """(N, K) float32: what MatMulNBits multiplies by."""
        q = self.values().astype(np.float32) - self.zeros()[..., None]
        return (q * self.scales[..., None]).reshape(self.shape)


@dataclass
class Channels:
    """One (N, K) weight matrix as 8-bit integers with one scale per output channel: w = scale * q,
    the form ONNX Runtime's integer GEMM (DynamicQuantizeMatMul) multiplies by."""
    q: np.ndarray  # int8 (N, K), -127..127
    scales: np.ndarray  # float32 (N,)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """(N, K) float32: what the integer GEMM multiplies by."""
        return self.q.astype(np.float32) * self.scales[:, None]


def int8_channels(w: np.ndarray) -> Channels:
    """(N, K) float weights -> 8 bits per output channel, symmetric (error at most half a step,
    max |w_row| / 127 / 2 per row)."""
    w = w.astype(np.float32)
    scale = np.abs(w).max(1) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return Channels(np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8), scale)


def _pack4(q: np.ndarray) -> np.ndarray:
    """(..., 2m) values 0..15 -> (..., m) bytes, element 2j in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _make(bits: int, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Blocks:
    """Blocks from q (N, kb, BLOCK), scales and integer zero points (N, kb)."""
    q, zeros = q.astype(np.uint8), zeros.astype(np.uint8)
    if bits == 8:
        return Blocks(8, q, scales.astype(np.float32), zeros)
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((len(zeros), 1), np.uint8)], 1)
    return Blocks(4, _pack4(q), scales.astype(np.float32), _pack4(zeros))


def _split(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    if k % BLOCK:
        raise NoQuantisedGraph(f"a weight with {k} inputs does not split into blocks of {BLOCK}")
    return w.astype(np.float32).reshape(n, k // BLOCK, BLOCK)


def round_blocks(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest per block with an integer zero point: (q, scales, zeros) for (N, kb, BLOCK)
    blocks. The range always holds 0, so the zero point lies on the grid."""
    top = 2 ** bits - 1
    lo = np.minimum(w.min(-1), 0.0)
    hi = np.maximum(w.max(-1), 0.0)
    scale = (hi - lo) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, top)
    q = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, top)
    return q, scale, zero


def float_blocks(w: np.ndarray, bits: int) -> Blocks:
    """(N, K) float weights -> `bits`-bit blocks, each rounded to nearest on its own grid."""
    return _make(bits, *round_blocks(_split(w), bits))


def int8_blocks(w: np.ndarray) -> Blocks:
    """(N, K) float weights -> 8-bit blocks (error at most half a step, (max-min)/255/2 per block)."""
    return float_blocks(w, 8)


def q4_from_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> Blocks:
    """Q4_1 blocks (w = d*q + m; d, m (N, kb), q (N, kb, BLOCK) 0..15) -> 4-bit blocks with integer zero
    points. Per block, the smaller squared error of: (a) d and q kept, zero point round(-m/d) (every
    weight of the block moves by the same |m + d*z| <= d/2), or (b) the block rounded afresh (round_blocks).
    (Keeping the exact weights costs an fp32 correction per projection: 40% more time a token, measured.)"""
    w = d[..., None] * q + m[..., None]
    safe_d = np.where(d > 0, d, 1.0)
    zero_a = np.clip(np.round(-m / safe_d), 0, 15)
    err_a = ((safe_d[..., None] * (q - zero_a[..., None]) - w) ** 2).sum(-1)
    q_b, scale_b, zero_b = round_blocks(w, 4)
    err_b = ((scale_b[..., None] * (q_b - zero_b[..., None]) - w) ** 2).sum(-1)
    keep = (err_a <= err_b) & (d > 0)
    return _make(4, np.where(keep[..., None], q, q_b), np.where(keep, safe_d, scale_b), np.where(keep, zero_a, zero_b))


def q8_from_q8_0(d: np.ndarray, q: np.ndarray) -> Blocks:
    """Q8_0 blocks (w = d*q, q int8) -> 8-bit blocks, exactly: q + 128 with zero point 128."""
    return _make(8, q.astype(np.int16) + 128, d, np.full(d.shape, 128))


def weight_error(quantised: Blocks | Channels, w: np.ndarray) -> dict:
    """How far the quantised weight is from `w`: the largest |dw| and ||dw|| / ||w||."""
    dw = quantised.dequantize() - w
    return {"max_abs": float(np.abs(dw).max()), "relative_rms": float(np.linalg.norm(dw) / max(np.linalg.norm(w), 1e-30))}


# --- GGUF files ---------------------------------------------------------------------------------

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def read_gguf_blocks(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, raw bytes (rows, bytes a row)) of every tensor in a GGUF file (memory-mapped)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise ValueError(f"{path} cannot be read as a GGUF file ({type(err).__name__}: {str(err)[:120]}): the file is "
                         f"damaged or truncated; download or reinstall it.") from None
    return {t.name: (t.tensor_type.name, t.data) for t in reader.tensors}


def decode_q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_1 rows (N, kb*20 bytes) -> d, m (N, kb) float32 and q (N, kb, BLOCK) uint8. A block is
    d (fp16), m (fp16), then 16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31."""
    b = np.ascontiguousarray(raw).reshape(len(raw), -1, 20)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    return d, m, np.concatenate([qs & 0x0F, qs >> 4], -1)


def decode_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw Q8_0 rows (N, kb*34 bytes) -> d (N, kb) float32 and q (N, kb, BLOCK) int8."""
    b = np.ascontiguousarray(raw).reshape(len(raw), -1, 34)
    return b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32), b[..., 2:].copy().view(np.int8)


def gguf_matrix(kind: str, raw: np.ndarray) -> tuple[Blocks, np.ndarray]:
    """A GGUF tensor of a type the mapping covers -> (its 4- or 8-bit Blocks, its de-quantised (N, K)
    float32 weight as the file defines it)."""
    if kind == GGUF_Q4_1:
        d, m, q = decode_q4_1(raw)
        return q4_from_q4_1(d, m, q), (d[..., None] * q + m[..., None]).reshape(len(raw), -1)
    if kind == GGUF_Q8_0:
        d, q = decode_q8_0(raw)
        return q8_from_q8_0(d, q), (d[..., None] * q).reshape(len(raw), -1)
    raise NotImplementedError(kind)


def llama_row_order(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of q_proj/k_proj head by head (rotary halves interleaved);
    this index takes its rows back to the Hugging Face order: hf = gguf[order]."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def find_rows(gguf_w: np.ndarray, model_w: np.ndarray, heads: int, name: str) -> np.ndarray | None:
    """The row order that makes the file's weight the model's (as stored, or llama.cpp's q/k order),
    checked value by value; None if neither does (the file holds another model)."""
    tol = 1e-6 * max(1.0, float(np.abs(model_w).max()))
    for order in (np.arange(len(gguf_w)), llama_row_order(len(gguf_w), heads) if name in ("q_proj", "k_proj") else None):
        if order is not None and gguf_w.shape == model_w.shape and np.abs(gguf_w[order] - model_w).max() <= tol:
            return order
    return None


def take_rows(blocks: Blocks, order: np.ndarray) -> Blocks:
    return Blocks(blocks.bits, blocks.packed[order], blocks.scales[order], blocks.zero_points[order])


class NoQuantisedGraph(ValueError):
    """This base cannot have this quantised graph (the export skips it and says why)."""


class NoQ4Blocks(NoQuantisedGraph):
    """No Q4_1 blocks for this base: not loaded from a GGUF, a GGUF of another type (Q5_K, Q8_0, ...), or a
    GGUF of another model. The export skips the q4 graph and says why; the int8 set serves instead."""


class QuantisedWeights:
    """Hands the fast graph the quantised weight of each projection for one weight set (Channels for
    int8, Blocks for q4), and keeps the error against the model's own weights (which, for a GGUF base,
    are the file's de-quantised weights).

        source = QuantisedWeights("q4", model, gguf_path)
        blocks = source.weight("model.layers.0.self_attn.q_proj", w)   # None: keep fp32
    """

    def __init__(self, weights: str, model, gguf_path: str | Path | None = None):
        if weights not in WEIGHTS[1:]:
            raise ValueError(f"weights must be one of {WEIGHTS[1:]} for a quantised graph, not {weights!r}.")
        self.weights, self.errors = weights, {}
        self.heads = {"q_proj": model.config.num_attention_heads,
                      "k_proj": getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads}
        self.tensors = None
        if weights == "q4":
            if gguf_path is None:
                raise NoQ4Blocks("weights='q4' takes the 4-bit blocks of a GGUF file, and this base was not loaded from "
                                 "one: use weights='int8' (any base) or load the base from its .gguf file.")
            self.gguf_path = Path(gguf_path)
            self.tensors = read_gguf_blocks(gguf_path)
            kinds = {kind for name, (kind, _) in self.tensors.items()  # the projections' weights (not norms, not biases)
                     if name.startswith("blk.") and name.split(".")[2] in GGUF_NAMES.values() and name.endswith(".weight")}
            if kinds - {GGUF_Q4_1}:
                raise NoQ4Blocks(f"{gguf_path} stores its projections as {', '.join(sorted(kinds))}; the q4 graph maps "
                                 f"{GGUF_Q4_1} blocks only: use weights='int8' (8-bit blocks of the de-quantised weights).")

    def _gguf_name(self, module: str) -> tuple[str, str]:
        parts = module.split(".")
        if parts[-1] in ("embed_tokens", "lm_head"):
            return ("token_embd.weight" if parts[-1] == "embed_tokens" else "output.weight"), parts[-1]
        return f"blk.{parts[-3]}.{GGUF_NAMES[parts[-1]]}.weight", parts[-1]

    def weight(self, module: str, w: np.ndarray) -> Blocks | Channels | None:
        """The quantised (N, K) weight of `module` (a name of the Hugging Face model), or None where the
        set keeps it in fp32 (a GGUF tensor stored as F32/F16)."""
        if self.weights == "int8":
            out = int8_channels(w)
        else:
            name, short = self._gguf_name(module)
            if short == "lm_head" and name not in self.tensors:
                name = "token_embd.weight"  # tied: the output head is the token table
            if name not in self.tensors:
                raise NoQ4Blocks(f"{self.gguf_path} has no tensor {name} for {module}: the file holds another model.")
            kind, raw = self.tensors[name]
            if kind in ("F32", "F16", "BF16"):
                return None
            if kind not in (GGUF_Q4_1, GGUF_Q8_0):  # an output head in a K-quant: its de-quantised values in 8 bits
                out = int8_blocks(w)
            else:
                out, exact = gguf_matrix(kind, raw)
                order = find_rows(exact, w, self.heads.get(short, 1), short)
                if order is None:
                    raise NoQ4Blocks(f"{self.gguf_path}: tensor {name} does not hold the weights of {module} of the "
                                     f"loaded base: the file belongs to another model.")
                out = take_rows(out, order)
        self.errors[module] = weight_error(out, w)
        return out

    def report(self) -> dict:
        """The error of the whole set against the model's weights: worst |dw|, worst and mean relative RMS."""
        rel = [e["relative_rms"] for e in self.errors.values()]
        return {"weights": self.weights, "tensors": len(rel),
                "max_abs": max((e["max_abs"] for e in self.errors.values()), default=0.0),
                "max_relative_rms": max(rel, default=0.0), "mean_relative_rms": float(np.mean(rel)) if rel else 0.0}


def concat(parts: list[Blocks | Channels]) -> Blocks | Channels:
    """Quantised matrices with the same K stacked along N (packed q|k|v, gate|up)."""
    if isinstance(parts[0], Channels):
        return Channels(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]))
    return Blocks(parts[0].bits, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("packed", "scales", "zero_points")))
