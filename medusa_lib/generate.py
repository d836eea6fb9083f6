"""Command line: one reply with Medusa on ONNX Runtime, with tau and tokens per second.

    python -m medusa_lib.generate --prompt "Tell me about llamas" [--heads DIR] [--tree FILE]
        [--max-new-tokens N] [--temperature T] [--plain] [--weights fp32|int8|q4]

--heads is a heads checkpoint folder (exported to ONNX on first use) or an exported ONNX folder;
--tree a tree JSON (notebooks 03 and 06 write data/<preset>/trees/; a 'lookup' section in it adds
prompt lookup and a 'rule' section drafts by confidence, as trees/tree_hydra_pld_device.json may).
Both default to what the workbook's last run produced. --weights picks the base's weights (the
config's `weights`, default fp32; int8 and q4 decode chains, see docs/quantised.md, and take notebook
06's plan for them, trees/tree_hydra_pld_<weights>.json, when the heads are sequential).
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from medusa_lib.base import checkpoint_path
from medusa_lib.bench import default_tree_file
from medusa_lib.config import WEIGHTS, get_config
from medusa_lib.decoding import generate, load_runtime
from medusa_lib.export import read_export_info, resolve_export_dir
from medusa_lib.tree import load_plan, plan_size


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", required=True); p.add_argument("--tree")
    p.add_argument("--heads", help="heads checkpoint folder (e.g. data/full/hydra) or exported ONNX folder")
    p.add_argument("--max-new-tokens", type=int); p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0); p.add_argument("--threads", type=int)
    p.add_argument("--plain", action="store_true", help="plain decoding, no heads (the baseline)")
    p.add_argument("--weights", choices=WEIGHTS, help="the base's weights (default: the preset's `weights`)")
    p.add_argument("--preset")
    a = p.parse_args(argv)
    if not a.prompt.strip():
        p.error("--prompt is empty: give the text to answer.")
    if a.max_new_tokens is not None and a.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be >= 0 (0 makes none), not {a.max_new_tokens}.")
    if a.plain and a.tree:
        raise ValueError("--plain decodes without a tree, and --tree names one: give one of the two.")
    cfg = get_config(a.preset, **({"weights": a.weights} if a.weights else {}))
    export_dir = resolve_export_dir(cfg, a.heads)
    info = read_export_info(export_dir)
    sequential = info.get("token_inputs") == "path"
    plan = a.tree or default_tree_file(cfg, sequential)
    sized = cfg.data_dir / "trees" / f"tree_hydra_pld_{cfg.weights}.json"  # notebook 06's plan for a quantised graph
    if not a.tree and sequential and cfg.weights != "fp32" and sized.is_file():
        plan = sized
    tree, lookup = (None, {}) if a.plain else load_plan(plan, info["num_heads"])
    rt = load_runtime(export_dir, cfg.kv_capacity, a.threads if a.threads is not None else cfg.threads,
                      max_nodes=plan_size(tree, **lookup) if tree else 1, graph=cfg.base_graph, weights=cfg.weights)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(info.get("base_model") or cfg.base_model))
    text = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    max_new_tokens = cfg.max_new_tokens if a.max_new_tokens is None else a.max_new_tokens
    out, stats = generate(rt, ids, tree, max_new_tokens, a.temperature, a.seed, **lookup)
    print(tokenizer.decode(out, skip_special_tokens=True))
    print(f"\n[{stats.new_tokens} tokens, tau {stats.tau:.2f}, {stats.decode_tok_per_s:.1f} tok/s decode, "
          f"stopped on {stats.stopped}, {rt.graph} graph, {rt.weights} weights]")


if __name__ == "__main__":
    from medusa_lib.cli import run_cli
    run_cli(main)
