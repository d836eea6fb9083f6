"""How the fast graph's attention cost grows with the cached prefix, the attention alone.

One com.microsoft.GroupQueryAttention node per layer (30, as in SmolLM2-135M: head_dim 64, 3 kv heads),
each with its own shared past/present buffers bound in place, as the fast graph runs them; no
weights around them. Prints ms per pass for 100 and 1,900 cached tokens, for 9 query heads on 3 kv
heads (the model) and 3 on 3 (no query head shares a kv head: the least reading the kernel can do),
with an fp32 cache and with the operator's int8 cache (per-channel scales).

    python tools/probes/attention_prefix.py [--threads 2]
"""

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, HEAD_DIM, KV_HEADS, CAPACITY = 30, 64, 3, 2048


def session(heads: int, int8: bool, threads: int) -> ort.InferenceSession:
    cache = TensorProto.INT8 if int8 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "T", (heads + 2 * KV_HEADS) * HEAD_DIM]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, "T", "S"])]
    outputs, nodes = [], []
    scales = ["", "k_scale", "v_scale"] if int8 else []
    quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8) if int8 else {}
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_{kv}{i}", cache, [1, KV_HEADS, CAPACITY, HEAD_DIM]) for kv in "kv"]
        outputs += [helper.make_tensor_value_info(f"ctx{i}", TensorProto.FLOAT, None)]
        outputs += [helper.make_tensor_value_info(f"present_{kv}{i}", cache, None) for kv in "kv"]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "", "", "", "bias", *scales],
            [f"ctx{i}", f"present_k{i}", f"present_v{i}"], domain="com.microsoft", num_heads=heads,
            kv_num_heads=KV_HEADS, **quant))
    scale = [helper.make_tensor(name, TensorProto.FLOAT, [1, KV_HEADS, 1, HEAD_DIM], [0.05] * (KV_HEADS * HEAD_DIM))
             for name in ("k_scale", "v_scale")] if int8 else []
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, scale),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def pass_ms(s: ort.InferenceSession, heads: int, int8: bool, T: int, n: int, caches, rng, reps: int = 30) -> float:
    io = s.io_binding()
    io.bind_cpu_input("qkv", rng.standard_normal((1, T, (heads + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32))
    io.bind_cpu_input("seqlens_k", np.array([n + T - 1], np.int32))
    io.bind_cpu_input("total", np.array(n + T, np.int32))
    io.bind_cpu_input("bias", np.zeros((1, 1, T, n + T), np.float32))
    for i in range(LAYERS):
        io.bind_output(f"ctx{i}", "cpu")
        for j, kv in enumerate("kv"):  # past and present: one buffer, written in place
            io.bind_ortvalue_input(f"past_{kv}{i}", caches[2 * i + j])
            io.bind_ortvalue_output(f"present_{kv}{i}", caches[2 * i + j])
    for _ in range(5):
        s.run_with_iobinding(io)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run_with_iobinding(io)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads; ms per pass of {LAYERS} attention nodes")
    print("cache | query heads | T | 100 cached | 1,900 cached | growth")
    for int8 in (False, True):
        for heads in (9, 3):
            s = session(heads, int8, args.threads)
            shape = (1, KV_HEADS, CAPACITY, HEAD_DIM)
            caches = [ort.OrtValue.ortvalue_from_numpy(rng.integers(-100, 100, shape).astype(np.int8) if int8 else
                                                       rng.standard_normal(shape).astype(np.float32)) for _ in range(2 * LAYERS)]
            for T in (2, 9):  # one token and eight, each with the fast graph's spare row
                short, long = (pass_ms(s, heads, int8, T, n, caches, rng) for n in (100, 1900))
                print(f"{'int8' if int8 else 'fp32'} | {heads} on {KV_HEADS} | {T} | {short:.2f} | {long:.2f} | +{long - short:.2f}",
                      flush=True)
    a = rng.standard_normal(LAYERS * 2 * KV_HEADS * 1900 * HEAD_DIM).astype(np.float32)  # the fp32 cache at 1,900
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    print(f"one thread summing the fp32 cache of 1,900 tokens ({a.nbytes / 1e6:.1f} MB): {1e3 * np.median(times):.2f} ms")


if __name__ == "__main__":
    main()
