"""What a step's heads calls cost in decoding: sequential heads, one ONNX Runtime call per depth.

Times the first three depths' heads (batch of one parent each) back to back (warm) and right after
a one-token pass of the base (cold: the pass streams the base's weights through the caches first),
as three calls and as one call of a graph that holds all three (same outputs), and with the heads
on the caller's thread or on two threads of their own.

    python tools/probes/heads_calls.py data/full/hydra/onnx
"""

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import compose, helper

from medusa_lib.decoding import _session_options, load_runtime, run_base

DEPTHS = 3


def merged_heads(export_dir: str) -> bytes:
    """heads_0..heads_{DEPTHS-1} side by side in one graph: a shared hidden_states input, the rest prefixed d{k}_."""
    parts = [compose.add_prefix(onnx.load(f"{export_dir}/heads_{k}.onnx"), f"d{k}_") for k in range(DEPTHS)]
    nodes, inits, inputs, outputs = [], [], [], []
    for k, part in enumerate(parts):
        for node in part.graph.node:
            node.input[:] = ["hidden_states" if x == f"d{k}_hidden_states" else x for x in node.input]
            nodes.append(node)
        inits += part.graph.initializer
        inputs += [i for i in part.graph.input if i.name != f"d{k}_hidden_states"]
        outputs += part.graph.output
    hidden = [i for i in onnx.load(f"{export_dir}/heads_0.onnx").graph.input if i.name == "hidden_states"]
    model = helper.make_model(helper.make_graph(nodes, "heads", hidden + inputs, outputs, inits),
                              opset_imports=parts[0].opset_import)
    model.ir_version = parts[0].ir_version
    return model.SerializeToString()


def median_ms(fn, before=None, reps: int = 40) -> float:
    times = []
    for _ in range(reps):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="an export of sequential heads (token_inputs 'path'), e.g. data/full/hydra/onnx")
    args = parser.parse_args()
    rt = load_runtime(args.export_dir, 2048, 0)  # the base as decoding runs it: 2 spinning threads
    if rt.info.get("token_inputs") != "path" or len(rt.heads) < DEPTHS:
        raise SystemExit(f"{args.export_dir} holds no sequential heads with {DEPTHS} depths: pass the sequential heads' export.")
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, rt.info["hidden_size"])).astype(np.float32)
    paths = [rng.integers(0, rt.info["vocab_size"], k + 1) for k in range(DEPTHS)]
    feeds = [{"hidden_states": h, "token_embeddings": np.asarray(rt.embed[p])[None]} for p in paths]
    two = _session_options(2, False)
    own_pool = [ort.InferenceSession(f"{args.export_dir}/heads_{k}.onnx", two, providers=["CPUExecutionProvider"])
                for k in range(DEPTHS)]
    merged = ort.InferenceSession(merged_heads(args.export_dir), _session_options(1, False), providers=["CPUExecutionProvider"])
    merged_feeds = {"hidden_states": h, **{f"d{k}_token_embeddings": f["token_embeddings"] for k, f in enumerate(feeds)}}
    separate = [x for k in range(DEPTHS) for x in rt.heads[k].run(None, feeds[k])]
    assert all(np.array_equal(a, b) for a, b in zip(merged.run(None, merged_feeds), separate)), "merged graph differs"
    n = 100

    def base_pass():
        bias = rt.bias(1, n)
        bias.zero_()
        run_base(rt, np.array([1]), np.array([n]), bias, n)

    variants = {"three calls, caller's thread": lambda: [rt.heads[k].run(None, feeds[k]) for k in range(DEPTHS)],
                "three calls, two threads of their own": lambda: [own_pool[k].run(None, feeds[k]) for k in range(DEPTHS)],
                "one call, caller's thread": lambda: merged.run(None, merged_feeds)}
    print(f"ONNX Runtime {ort.__version__}; {DEPTHS} depths of {args.export_dir}, ms (median of 40)")
    print("heads | warm | right after a base pass | the base pass")
    for name, fn in variants.items():
        print(f"{name} | {median_ms(fn):.2f} | {median_ms(fn, base_pass):.2f} | {median_ms(base_pass):.1f}", flush=True)


if __name__ == "__main__":
    main()
