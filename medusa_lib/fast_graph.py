"""The fast base graph: the same model as export.TreeStep, written with ONNX Runtime's fused operators.

export.TreeStep is the readable reference (notebook 04): the PyTorch module traced op by op, about
80 ONNX nodes a layer, and a KV cache that is concatenated and expanded every pass. This module
writes the graph by hand instead, from the model's weights, with about a dozen nodes a layer:

    SkipSimplifiedLayerNormalization    residual add + RMSNorm in one node
    MatMul (packed q|k|v) [+ Add bias]  one projection for the three
    GroupQueryAttention                 rotary from explicit position ids, the grouped kv heads,
                                        causal order + the tree as an additive bias, and the new
                                        K/V rows written in place into a preallocated cache
    MatMul (o_proj)
    SkipSimplifiedLayerNormalization
    MatMul (packed gate|up), Split, Sigmoid, Mul, Mul   SiLU(gate) * up
    MatMul (down_proj)

Inputs and outputs (B = 1, T new tokens, capacity S of the cache):
  inputs   input_ids [1, T] int64, position_ids [1, T] int64,
           attention_bias [1, 1, T, n+T] float (the tree mask; causal order is GQA's own),
           seqlens_k [1] int32 = n+T-1, total_sequence_length [] int32 = n+T,
           past_key_values.{i}.key / .value  [1, kv_heads, S, head_dim]  (head-major: GQA's layout)
  outputs  logits [1, T, V], hidden_states [1, T, C],
           present.{i}.key / .value  [1, kv_heads, S, head_dim]: bound to the same memory as the past,
           so ORT reads rows 0..n-1 and writes rows n..n+T-1 in place.

Positions are explicit (n + depth of each tree node), so the keys of a tree node are rotated for the
position it will hold once accepted, exactly as in the reference graph.

The quantised graphs (quant.py) swap each projection's MatMul: q4 for MatMulNBits on the GGUF's 4-bit
blocks, int8 for ONNX Runtime's integer GEMM, DynamicQuantizeMatMul, on 8-bit weights. That operator
rounds its input to uint8 over the whole tensor, so a row's rounding would depend on the other rows of
the pass, and a token verified in a wide pass would not be the token decoded alone. Each int8
projection therefore rounds every row on its own grid (`matmul_int8_rows`):

    m  = max |x| of each row (at least 1e-30)          (1, T, 1)
    xg = [x / m ; guard row (1, -1, 0, ...)]           (1, T+1, K)  every row inside [-1, 1], the
                                                                    guard fixes the tensor's range
    y  = DynamicQuantizeMatMul(xg, W8, scales)[:T] * m (1, T, N)    the integer product is exact

so a row gives the same bits in any pass, as the attention's spare row makes the attention do.

An fp16 export writes the fp32 weight set in fp16 (`fp16=True`): ONNX Runtime's CUDA provider has
GroupQueryAttention kernels for fp16 and bf16 only, so that is the fast graph a GPU can run.

    problem = fast_graph_problem(model)      # None, or why this base cannot have the fast graph
    export_fast_base(model, "data/onnx")     # -> data/onnx/base_fast.onnx
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from medusa_lib.quant import ACCURACY_LEVEL, BLOCK, Channels, concat

FAST_FILE = "base_fast.onnx"
OPSET = 17
MS_DOMAIN = "com.microsoft"
FAST_GRAPH_VERSION = 4  # 2: the attention's spare row, the quantised graphs beside it; 3: int8 on the integer GEMM;
# 4: an fp16 export carries the fast graph in fp16 (exports record it)
SPARE_ROWS = 1  # cache rows after the last token that a pass may write (the attention's spare row)
MAX_POSITIONS = 8192  # rotary tables' rows: the largest KV capacity the fast graph serves (unless the base has fewer)


def fast_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{part}" for i in range(num_layers) for part in ("key", "value")]
    return (["input_ids", "position_ids", "attention_bias", "seqlens_k", "total_sequence_length"]
            + [f"past_key_values.{n}" for n in kv],
            ["logits", "hidden_states"] + [f"present.{n}" for n in kv])


def fast_graph_problem(model) -> str | None:
    """None when the fast graph can express this base exactly; else why not (the caller falls back
    to the reference graph and says so)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj"):
        return f"{type(model).__name__} is not a Llama-family decoder"
    attn, mlp = layers[0].self_attn, layers[0].mlp
    cfg = model.config
    if hasattr(attn, "q_norm"):
        return "per-head q/k norms (Qwen3) are not written in the fast graph"
    if attn.head_dim % 16:
        return f"head_dim {attn.head_dim} is not a multiple of 16 (GroupQueryAttention's rotary needs it)"
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "the MLP is not gate/up/down"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {cfg.hidden_act!r} (the fast graph writes SiLU)"
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} depends on the sequence length"
    if getattr(attn, "sliding_window", None) or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(attn.o_proj, "bias", None) is not None or getattr(mlp.down_proj, "bias", None) is not None:
        return "biases on o_proj or the MLP"
    return None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def rotary_tables(model, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (rows, rotary_dim/2) from the base's own rotary embedding (its scaling included)."""
    inner = model.model
    x = torch.zeros(1, 1, model.config.hidden_size)
    with torch.no_grad():
        cos, sin = inner.rotary_emb(x, torch.arange(rows)[None])  # (1, rows, rotary_dim), halves repeated
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]), _np(sin[0, :, :half])


def build_fast_graph(model, max_positions: int = MAX_POSITIONS, quantised=None, fp16: bool = False) -> onnx.ModelProto:
    """The fast graph of `model` as an in-memory ONNX model: fp32 weights, or with `quantised` (a
    quant.QuantisedWeights) every projection and the output head quantised (MatMulNBits blocks for q4,
    the integer GEMM on 8-bit channels for int8). With `fp16` every float (weights, activations, cache,
    bias, outputs) is fp16: the graph ONNX Runtime's CUDA provider can run, since its
    GroupQueryAttention kernels are fp16/bf16 only (the norms still accumulate in fp32)."""
    problem = fast_graph_problem(model)
    if problem:
        raise NotImplementedError(f"No fast graph for this base: {problem}.")
    if fp16 and quantised is not None:
        raise NotImplementedError("The quantised fast graphs are written with fp32 activations only, not fp16.")
    real = np.float16 if fp16 else np.float32
    cfg, inner = model.config, model.model
    layers = inner.layers
    attn0 = layers[0].self_attn
    D = attn0.head_dim
    H = attn0.q_proj.out_features // D
    Hkv = attn0.k_proj.out_features // D
    C = cfg.hidden_size
    V = model.get_output_embeddings().weight.shape[0]
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    rows = min(max_positions, int(getattr(cfg, "max_position_embeddings", max_positions) or max_positions))
    names_in, names_out = fast_io_names(len(layers))
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=real)
                                             if array.dtype.kind == "f" else np.ascontiguousarray(array), name))
        return name

    def node(op, inputs, outputs, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outputs[0]

    def linear(x, out, modules: list[tuple[str, torch.nn.Linear]]):
        """x @ W^T for the modules' weights stacked along the outputs: one MatMul (fp32), MatMulNBits (q4)
        or the integer GEMM (int8)."""
        parts = None if quantised is None else [quantised.weight(name, _np(m.weight)) for name, m in modules]
        if parts is None or any(p is None for p in parts):
            w = np.concatenate([_np(m.weight) for _, m in modules])  # (N, K)
            return node("MatMul", [x, init(out + ".w", w.T)], [out])
        return quantised_matmul(x, out, concat(parts))

    def quantised_matmul(x, out, b):
        return matmul_int8_rows(x, out, b) if isinstance(b, Channels) else matmul_nbits(x, out, b)

    def matmul_nbits(x, out, b):
        (N, K), kb = b.shape, b.packed.shape[1]
        inputs = [x, init(out + ".q", b.packed), init(out + ".scales", b.scales.reshape(-1)),
                  init(out + ".zeros", b.zero_points.reshape(-1))]
        return node("MatMulNBits", inputs, [out], domain=MS_DOMAIN, K=K, N=N, bits=b.bits, block_size=BLOCK,
                    accuracy_level=ACCURACY_LEVEL)

    def matmul_int8_rows(x, out, b: Channels):
        """x (1, T, K) @ W^T on the integer GEMM, each row rounded to 8 bits on its own (module docstring)."""
        K = b.shape[1]
        if "tiny" not in shared:
            shared.add(init("tiny", np.array(1e-30, dtype=np.float32)))  # the divisor's floor: a row of zeros stays zeros
        if f"guard_{K}" not in shared:
            guard = np.zeros((1, 1, K), dtype=np.float32)
            guard[0, 0, :2] = 1.0, -1.0
            shared.add(init(f"guard_{K}", guard))
        peak = node("ReduceMax", [node("Abs", [x], [out + ".abs"])], [out + ".peak"], axes=[-1], keepdims=1)
        peak = node("Max", [peak, "tiny"], [out + ".divisor"])  # (1, T, 1)
        unit = node("Div", [x, peak], [out + ".unit"])  # (1, T, K): each row inside [-1, 1]
        rows = node("Concat", [unit, f"guard_{K}"], [out + ".rows"], axis=1)  # (1, T+1, K): the guard fixes the range
        y = node("DynamicQuantizeMatMul", [rows, init(out + ".q8", b.q.T), init(out + ".scales", b.scales)],
                 [out + ".guarded"], domain=MS_DOMAIN)  # (1, T+1, N)
        y = node("Slice", [y, "zero", "minus_one", "axis_1"], [out + ".int8"])  # (1, T, N): the guard row dropped
        return node("Mul", [y, peak], [out])

    shared = set()  # initializers of the int8 projections, written once
    cos, sin = rotary_tables(model, rows)
    init("cos_cache", cos); init("sin_cache", sin)
    init("embed", _np(inner.embed_tokens.weight))  # (V, C)
    init("split_sizes", np.array([layers[0].mlp.gate_proj.out_features] * 2, dtype=np.int64))
    # GroupQueryAttention takes one spare row after the T real ones (zeros, placed after the last token,
    # written to cache row n+T and overwritten by the next pass; causal order hides it from the real
    # rows). Its CPU kernel computes a row bit for bit alike in any pass of two rows or more, but not in a
    # pass of one, so with the spare row a token's attention no longer depends on the pass width.
    init("pad_one_row", np.array([0, 0, 0, 0, 1, 0], dtype=np.int64))  # (1, T, F) -> (1, T+1, F)
    node("Pad", ["attention_bias", init("pad_bias", np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=np.int64))], ["gqa_bias"])
    node("Pad", ["position_ids", init("pad_position", np.array([0, 0, 0, 1], dtype=np.int64))], ["gqa_positions"],
         mode="edge")  # (1, T+1): the spare row at the last token's position
    init("minus_one", np.array([-1], dtype=np.int64)); init("axis_1", np.array([1], dtype=np.int64))
    node("Add", ["seqlens_k", init("one", np.array(1, dtype=np.int32))], ["gqa_seqlens_k"])
    node("Add", ["total_sequence_length", "one"], ["gqa_total"])
    init("zero", np.array([0], dtype=np.int64))
    x = node("Gather", ["embed", "input_ids"], ["x_0"])  # (1, T, C)
    residual, delta = None, None
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        p = f"l{i}."
        # 1 residual add + input norm
        if delta is None:
            h = node("SimplifiedLayerNormalization", [x, init(p + "ln1", _np(layer.input_layernorm.weight))], [p + "h"],
                     axis=-1, epsilon=eps, stash_type=1)
            residual = x
        else:
            h = node("SkipSimplifiedLayerNormalization", [delta, residual, init(p + "ln1", _np(layer.input_layernorm.weight))],
                     [p + "h", "", "", p + "r_in"], domain=MS_DOMAIN, epsilon=eps)
            residual = p + "r_in"
        # 2 packed q|k|v
        m = f"model.layers.{i}."
        qkv = linear(h, p + "qkv", [(m + "self_attn." + n, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")])
        # (1, T, Dq+2Dkv)
        if attn.q_proj.bias is not None:  # Qwen2: biases on q, k, v
            b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            qkv = node("Add", [qkv, init(p + "b_qkv", _np(b))], [p + "qkv_b"])
        # 3 attention: rotary, grouped kv heads, causal + tree bias, cache written in place
        past_k, past_v = names_in[5 + 2 * i], names_in[6 + 2 * i]
        qkv = node("Pad", [qkv, "pad_one_row"], [p + "qkv_spare"])  # (1, T+1, Dq+2Dkv)
        ctx = node("GroupQueryAttention",
                   [qkv, "", "", past_k, past_v, "gqa_seqlens_k", "gqa_total", "cos_cache", "sin_cache",
                    "gqa_positions", "gqa_bias"],
                   [p + "ctx_spare", names_out[2 + 2 * i], names_out[3 + 2 * i]], domain=MS_DOMAIN,
                   num_heads=H, kv_num_heads=Hkv, do_rotary=1, rotary_interleaved=0, scale=float(attn.scaling))
        ctx = node("Slice", [ctx, "zero", "minus_one", "axis_1"], [p + "ctx"])  # (1, T, Dq): the spare row dropped
        attn_out = linear(ctx, p + "attn", [(m + "self_attn.o_proj", attn.o_proj)])  # (1, T, C)
        # 4 residual add + post-attention norm
        h2 = node("SkipSimplifiedLayerNormalization",
                  [attn_out, residual, init(p + "ln2", _np(layer.post_attention_layernorm.weight))],
                  [p + "h2", "", "", p + "r_mid"], domain=MS_DOMAIN, epsilon=eps)
        residual = p + "r_mid"
        # 5 MLP: SiLU(gate) * up, then down
        gu = linear(h2, p + "gu", [(m + "mlp.gate_proj", mlp.gate_proj), (m + "mlp.up_proj", mlp.up_proj)])  # (1, T, 2I)
        gate, up = p + "gate", p + "up"
        node("Split", [gu, "split_sizes"], [gate, up], axis=-1)
        act = node("Mul", [gate, node("Sigmoid", [gate], [p + "sig"])], [p + "silu"])
        delta = linear(node("Mul", [act, up], [p + "act"]), p + "mlp", [(m + "mlp.down_proj", mlp.down_proj)])  # (1, T, C)
    node("SkipSimplifiedLayerNormalization", [delta, residual, init("ln_f", _np(inner.norm.weight))],
         ["hidden_states", "", "", "r_out"], domain=MS_DOMAIN, epsilon=eps)
    lm = model.get_output_embeddings()
    tied = lm.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
    lm_q = None if quantised is None else quantised.weight("lm_head", _np(lm.weight))
    if lm_q is not None:  # the output head quantised (for a tied head, the token table)
        quantised_matmul("hidden_states", "logits", lm_q)
    elif tied:  # one copy of the table: Gemm reads it transposed
        flat = node("Reshape", ["hidden_states", init("shape_2d", np.array([-1, C], dtype=np.int64))], ["h_2d"])
        out = node("Gemm", [flat, "embed"], ["logits_2d"], transB=1)
        node("Reshape", [out, init("shape_3d", np.array([1, -1, V], dtype=np.int64))], ["logits"])
    else:
        node("MatMul", ["hidden_states", init("w_lm", _np(lm.weight).T)], ["logits"])
    if getattr(lm, "bias", None) is not None:
        raise NotImplementedError("No fast graph for this base: a bias on lm_head.")

    f, i32, i64 = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    kv = [1, Hkv, "S", D]
    inputs = [helper.make_tensor_value_info("input_ids", i64, [1, "T"]),
              helper.make_tensor_value_info("position_ids", i64, [1, "T"]),
              helper.make_tensor_value_info("attention_bias", f, [1, 1, "T", "n_plus_T"]),
              helper.make_tensor_value_info("seqlens_k", i32, [1]),
              helper.make_tensor_value_info("total_sequence_length", i32, [])]
    inputs += [helper.make_tensor_value_info(n, f, kv) for n in names_in[5:]]
    outputs = [helper.make_tensor_value_info("logits", f, [1, "T", V]),
               helper.make_tensor_value_info("hidden_states", f, [1, "T", C])]
    outputs += [helper.make_tensor_value_info(n, f, kv) for n in names_out[2:]]
    graph = helper.make_graph(nodes, "medusa_fast_base", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="medusa_lib.fast_graph")
    proto.metadata_props.append(onnx.StringStringEntryProto(key="max_positions", value=str(rows)))
    return proto


def fast_file(weights: str = "fp32") -> str:
    """The fast graph's file name for a weight set: base_fast.onnx, base_fast_int8.onnx, base_fast_q4.onnx."""
    return FAST_FILE if weights == "fp32" else FAST_FILE.replace(".onnx", f"_{weights}.onnx")


def export_fast_base(model, out_dir: str | Path, max_positions: int = MAX_POSITIONS, weights: str = "fp32",
                     gguf_path: str | Path | None = None, fp16: bool = False) -> tuple[Path, dict | None]:
    """Write the fast graph with `weights` (quant.WEIGHTS) to out_dir/fast_file(weights) (weights beside it
    when over protobuf's 2 GB limit); renamed into place last, so an interrupted export never leaves a
    file that looks whole; with `fp16`, the fp32 weight set in fp16 (build_fast_graph). Returns (path,
    the quantised weights' error report or None for fp32).
    A q4 request for a base without Q4_1 blocks raises quant.NoQ4Blocks."""
    from medusa_lib.export import EXTERNAL_DATA_LIMIT
    from medusa_lib.quant import QuantisedWeights

    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    quantised = None if weights == "fp32" else QuantisedWeights(weights, model, gguf_path)
    proto = build_fast_graph(model, max_positions, quantised, fp16)
    proto.metadata_props.append(onnx.StringStringEntryProto(key="weights", value=weights))
    large = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_LIMIT - (64 << 20)
    path = out_dir / fast_file(weights)
    tmp = path.with_name(path.name + ".partial")
    onnx.save_model(proto, str(tmp), save_as_external_data=large, location=path.name + ".data" if large else None)
    os.replace(tmp, path)
    return path, (quantised.report() if quantised else None)


def max_positions_of(session) -> int:
    """The rotary tables' rows of a loaded fast graph: the largest KV capacity it can serve."""
    meta = session.get_modelmeta().custom_metadata_map
    return int(meta.get("max_positions", 0))
