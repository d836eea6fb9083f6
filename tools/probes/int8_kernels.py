"""How ONNX Runtime's CPU kernels for quantised projections grow with the rows of a pass.

A chain of 8 projections (576 -> 1,536 -> 576 -> ..., SmolLM2-135M's widths; random weights), timed
for passes of 1, 2, 4, 8 and 16 rows, in ms per projection (median of 200 runs):

    fp32        MatMul on fp32 weights
    nbits4      MatMulNBits, 4-bit blocks of 32, accuracy_level 4 (int8 activations per block): q4's kernel
    nbits8      the same with 8-bit blocks
    dqmm        DynamicQuantizeMatMul: 8-bit weights per output channel, the activations rounded to uint8
                over the whole tensor (the integer GEMM)
    dqmm_rows   dqmm with each row rounded on its own (fast_graph.py's int8 projection: the rows divided
                by their largest |x|, a guard row fixing the tensor's range, the product scaled back)

It also says whether a pass computes each row bit for bit as passes of one row do: a kernel that
does not cannot verify drafts losslessly (docs/quantised.md).

    python tools/probes/int8_kernels.py [--threads 2]
"""

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from medusa_lib.quant import float_blocks, int8_channels

WIDTHS, LAYERS, ROWS = (576, 1536), 4, (1, 2, 4, 8, 16)
KINDS = ("fp32", "nbits4", "nbits8", "dqmm", "dqmm_rows")


def session(kind: str, weights: list[np.ndarray], threads: int) -> ort.InferenceSession:
    nodes, inits, x = [], [], "x"

    def init(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    if kind == "dqmm_rows":
        init("zero", np.array([0], np.int64)); init("minus_one", np.array([-1], np.int64))
        init("axis_0", np.array([0], np.int64)); init("tiny", np.array(1e-30, np.float32))
    for i, w in enumerate(weights):
        K, N = w.shape
        y = f"y{i}"
        if kind == "fp32":
            nodes.append(helper.make_node("MatMul", [x, init(f"w{i}", w)], [y]))
        elif kind.startswith("nbits"):
            bits = int(kind[5:])
            b = float_blocks(w.T, bits)  # MatMulNBits' layout: (N, K) in blocks of 32
            nodes.append(helper.make_node("MatMulNBits", [x, init(f"w{i}", b.packed), init(f"s{i}", b.scales.reshape(-1)),
                                                          init(f"z{i}", b.zero_points.reshape(-1))], [y],
                                          domain="com.microsoft", K=K, N=N, bits=bits, block_size=32, accuracy_level=4))
        else:
            c = int8_channels(w.T)  # 8 bits per output channel, as the int8 graph's weights
            q, scale = np.ascontiguousarray(c.q.T), c.scales  # (K, N), (N,)
            if kind == "dqmm":
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, init(f"w{i}", q), init(f"s{i}", scale)], [y],
                                              domain="com.microsoft"))
            else:
                guard = np.zeros((1, K), np.float32)
                guard[0, :2] = 1, -1
                nodes += [helper.make_node("Abs", [x], [f"a{i}"]),
                          helper.make_node("ReduceMax", [f"a{i}"], [f"p{i}"], axes=[-1], keepdims=1),
                          helper.make_node("Max", [f"p{i}", "tiny"], [f"m{i}"]),
                          helper.make_node("Div", [x, f"m{i}"], [f"u{i}"]),
                          helper.make_node("Concat", [f"u{i}", init(f"g{i}", guard)], [f"r{i}"], axis=0),
                          helper.make_node("DynamicQuantizeMatMul", [f"r{i}", init(f"w{i}", q), init(f"s{i}", scale)],
                                           [f"o{i}"], domain="com.microsoft"),
                          helper.make_node("Slice", [f"o{i}", "zero", "minus_one", "axis_0"], [f"c{i}"]),
                          helper.make_node("Mul", [f"c{i}", f"m{i}"], [y])]
        x = y
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", WIDTHS[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal(WIDTHS if i % 2 == 0 else WIDTHS[::-1]) * 0.05).astype(np.float32)
               for i in range(2 * LAYERS)]
    print(f"ms per projection, rows {ROWS}; ONNX Runtime {ort.__version__}, {args.threads} threads")
    for kind in KINDS:
        s, row = session(kind, weights, args.threads), []
        for M in ROWS:
            x = rng.standard_normal((M, WIDTHS[0])).astype(np.float32)
            for _ in range(20):
                s.run(None, {"x": x})
            times = []
            for _ in range(200):
                t = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            row.append(1e3 * float(np.median(times)) / len(weights))
        x = rng.standard_normal((8, WIDTHS[0])).astype(np.float32)
        alone = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
        same = np.array_equal(s.run(None, {"x": x})[0], alone)
        print(f"{kind:10s} " + " ".join(f"{v:.3f}" for v in row)
              + f"   8 rows / 1 row {row[3] / row[0]:.2f}   rows bit for bit as alone: {same}")


if __name__ == "__main__":
    main()
