"""What a step's heads cost in decoding: sequential heads called depth by depth or in one call.

Times the sequential heads drafting a tree (a chain of three depths, or a plan's menu with --plan)
right after a one-token pass of the base, as the decoding loop meets them (the pass streams the
base's weights through the caches first), and back to back (warm):

- one ONNX Runtime call per depth, on the caller's thread or on a pool of one thread per core;
- one call of the graph that chains every depth (tree_heads.py, what decoding runs), the same two ways;
- with a plan that drafts by a rule: one call per depth on only the parents the rule drafted so far.

The base runs as decoding loads it: one thread per core, workers spinning during a run and stopped
when it returns. --base-keeps-spinning lets its workers spin on after each run instead.

    python tools/probes/heads_calls.py data/full/hydra/onnx [--plan data/full/trees/tree_hydra_pld_device.json]
"""

import argparse
import time

import numpy as np
import onnxruntime as ort

from medusa_lib import decoding
from medusa_lib.tree import build_tree, chain_paths, grow_draft, load_plan
from medusa_lib.tree_heads import TreeHeads


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
    parser.add_argument("--plan", help="draft this plan's tree (its menu) instead of a chain of three depths")
    parser.add_argument("--base-keeps-spinning", action="store_true", help="the base's workers spin on after each run")
    args = parser.parse_args()
    if args.base_keeps_spinning:
        made = decoding._session_options

        def keep_spinning(threads=0, spin=False):
            options = made(threads, spin)
            options.add_session_config_entry("session.force_spinning_stop", "0")
            return options
        decoding._session_options = keep_spinning
    rt = decoding.load_runtime(args.export_dir, 2048, 0)
    if rt.info.get("token_inputs") != "path":
        raise SystemExit(f"{args.export_dir} holds no sequential heads: pass the sequential heads' export.")
    tree = load_plan(args.plan, rt.info["num_heads"])[0] if args.plan else build_tree(chain_paths(3), rt.info["topk"], 3)
    files = [rt.heads_dir / name for name in rt.info["files"]["heads"]]
    providers = ["CPUExecutionProvider"]
    one, pool = decoding._session_options(1, False), decoding._session_options(0, True)
    sessions = {name: [ort.InferenceSession(str(f), options, providers=providers) for f in files]
                for name, options in (("caller's thread", one), ("one thread per core", pool))}
    chained = {name: TreeHeads(files, tree, rt.embed, options, providers)
               for name, options in (("caller's thread", one), ("one thread per core", pool))}
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, rt.info["hidden_size"])).astype(np.float32)
    root = int(rng.integers(0, rt.info["vocab_size"]))
    tokens, probs = chained["caller's thread"](root, h)

    def per_depth(heads):  # every depth on all its parents, the tokens found so far feeding the next
        found = np.full(tree.size, root)
        for d, level in enumerate(tree.levels):
            path = found[tree.ancestors[level.parents, : d + 1]]  # (B, d+1)
            ids, _ = heads[d].run(None, {"hidden_states": np.repeat(h, len(path), axis=0),
                                         "token_embeddings": np.asarray(rt.embed[path.reshape(-1)]).reshape(*path.shape, -1)})
            found[level.children] = ids[level.slot, level.rank]
        return found
    assert all(np.array_equal(per_depth(s), tokens) for s in sessions.values()), "one call drafts other tokens"
    rule = load_plan(args.plan, rt.info["num_heads"])[1].get("rule") if args.plan else None

    def rule_depths(heads):  # the former decoding: each depth only on the parents the rule drafted so far
        found = np.full(tree.size, root)

        def expand(d, on):
            level = tree.levels[d]
            path = found[tree.ancestors[level.parents[on], : d + 1]]  # (B', d+1)
            ids, p = heads[d].run(None, {"hidden_states": np.repeat(h, len(path), axis=0),
                                         "token_embeddings": np.asarray(rt.embed[path.reshape(-1)]).reshape(*path.shape, -1)})
            under = on[level.slot]
            slot = (np.cumsum(on) - 1)[level.slot[under]]
            found[level.children[under]] = ids[slot, level.rank[under]]
            return p[slot, level.rank[under]]
        return grow_draft(tree, rule, expand)
    n = 100

    def base_pass():
        bias = rt.bias(1, n)
        bias.zero_()
        decoding.run_base(rt, np.array([1]), np.array([n]), bias, n)

    variants = {**{f"{len(tree.levels)} calls, {name}": (lambda s=s: per_depth(s)) for name, s in sessions.items()},
                **{f"one call, {name}": (lambda c=c: c(root, h)) for name, c in chained.items()}}
    if rule is not None:
        variants.update({f"per depth on the parents {rule} drafts, {name}": (lambda s=s: rule_depths(s))
                         for name, s in sessions.items()})
    print(f"ONNX Runtime {ort.__version__}; {args.export_dir}, a {tree.size}-node tree of {len(tree.levels)} depths; "
          f"base workers {'spin on' if args.base_keeps_spinning else 'stop'} after a run; ms, median of 40")
    print("heads | warm | right after a base pass | the base pass")
    for name, fn in variants.items():
        print(f"{name} | {median_ms(fn):.2f} | {median_ms(fn, base_pass):.2f} | {median_ms(base_pass):.1f}", flush=True)


if __name__ == "__main__":
    main()
