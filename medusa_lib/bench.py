"""Benchmark: Medusa on ONNX Runtime against its peers, in one run, on held-out prompts.

Methods: hf (Hugging Face greedy generate), hf_pld (prompt lookup decoding), ort (plain greedy on
the exported base: the baseline, on the config's base graph, the fast one by default), ort_ref (plain
greedy on the reference graph of notebook 04, export.TreeStep), medusa_chain (top-1 chain), medusa_tree (the sparse tree) with
the paper's Medusa-1 heads, hydra_tree (a sparse tree proposed by the sequential heads, the
workbook's extension), hydra_pld (that tree plus a prompt-lookup chain on the steps where the text
repeats itself) and llamacpp (llama-cpp-python on the same GGUF, when installed). Same prompts and token limit for all,
warm-up excluded, methods alternated prompt by prompt. Also: the verification cost curve and the
heads' time a call, from which replay.py sizes each method's tree for this device.

    python -m medusa_lib.bench --limit 24 --max-new-tokens 128 --out data/bench/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from medusa_lib.config import BENCH_METHODS, WEIGHTS, WorkbookConfig, get_config, hydra_config, method_known, repo_root, split_method
from medusa_lib.export import resolve_export_dir
from medusa_lib.files import read_json, write_json
from medusa_lib.tree import TreeBuffers, build_tree, chain_paths, check_sized_for, load_plan, plan_size, save_tree

ALL_METHODS = BENCH_METHODS
ORT_METHODS = ("ort", "ort_ref", "medusa_chain", "medusa_tree", "hydra_tree", "hydra_pld")
PLAIN_METHODS = ("ort", "ort_ref")  # one token a pass, no tree
# A method may name a quantised base: "hydra_pld@q4" is hydra_pld on the q4 fast graph (config.split_method), judged
# against "ort@q4", plain decoding on that same graph (added to the run when missing).


def drafts(name: str) -> bool:
    """Whether method `name` drafts and verifies (a Medusa method on ORT, on any graph)."""
    method = split_method(name)[0]
    return method in ORT_METHODS and method not in PLAIN_METHODS


def plain_of(name: str) -> str | None:
    """The plain method on the same graph as an ORT method `name`: what its output must equal ("ort" or
    "ort@<weights>"); None for the peers (hf, hf_pld, llamacpp), which run other programs."""
    method, weights = split_method(name)
    if method not in ORT_METHODS:
        return None
    return "ort" if weights == "fp32" else f"ort@{weights}"
PLD_TOKENS = 10  # prompt_lookup_num_tokens for hf_pld


# ----------------------------------------------------------------------------------------------
# Prompts

def questions_path(setting: str | None) -> Path | None:
    """A questions setting of the config (bench_questions, sizing_questions) as a path: relative
    ones are read from the repository root; None stays None (the held-out ShareGPT prompts)."""
    if not setting:
        return None
    return Path(setting) if Path(setting).is_absolute() else repo_root() / setting


def load_questions(path: str | Path | None, cfg: WorkbookConfig, limit: int, from_end: bool = False) -> list[dict]:
    """question.jsonl rows {question_id, category, turns}; default: the held-out ShareGPT split's
    first user turns (category "sharegpt"). `limit` is spread evenly across categories, taken from
    the start of each (the benchmark) or from its end (`from_end`: notebook 06's sizing prompts, so
    that sizing and benchmark share no prompt when both read the same source)."""
    if path is None:
        from medusa_lib.data import first_prompt, read_prepared
        rows = []
        for conv in read_prepared(cfg.data_dir, "eval"):
            if any(m["role"] == "user" for m in conv["messages"]):
                rows.append({"question_id": conv["id"], "category": "sharegpt",
                             "turns": [first_prompt(conv["messages"])[-1]["content"]]})
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Questions file {path} does not exist (expected Spec-Bench/MT-bench question.jsonl).")
        rows = []
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not text
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be read): save it as UTF-8.") from None
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                assert isinstance(row["turns"], list) and isinstance(row["turns"][0], str)
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AssertionError):
                raise ValueError(f"{path}, line {i + 1}: not a question record with a 'turns' list of strings.") from None
            if not isinstance(row.get("category", "default"), str):
                raise ValueError(f"{path}, line {i + 1}: 'category' must be a string (or absent), not {row['category']!r}.")
            rows.append({"question_id": row.get("question_id", i), "category": row.get("category", "default"), "turns": row["turns"]})
    if not rows:
        where = path if path is not None else f"{cfg.data_dir / 'prepared' / 'eval.jsonl'} (held-out ShareGPT)"
        raise ValueError(f"{where} holds no questions: give a question.jsonl with at least one record, one per line.")
    by_cat = defaultdict(list)
    for row in (rows[::-1] if from_end else rows):
        by_cat[row["category"]].append(row)
    picked, cats = [], sorted(by_cat)
    while len(picked) < min(limit, len(rows)):
        for c in cats:
            if by_cat[c] and len(picked) < limit:
                picked.append(by_cat[c].pop(0))
    return picked


def prompt_ids(tokenizer, question: dict) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question["turns"][0]}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Tree sized for the hardware

def verify_cost_curve(rt, sizes, prefix: int = 200, reps: int = 25) -> dict[int, float]:
    """Seconds for one base forward of T tokens on top of `prefix` cached tokens, per T (median).
    The sizes take turns, one timed pass of each per round, so that a slow spell of a shared machine
    falls on every size alike instead of bending the curve at a few.

    Each timed pass follows an untimed pass of the same width: right after a wider pass a narrow one
    reads dearer than it costs among its like, and decoding runs mostly narrow passes in a row. Timed
    straight after the round's widest pass, a second token read 29% dearer than one on the int8 graph
    in one run and 14% in the next, and the replay gave the heads no node where one node measured 1.34x
    against 1.22x without it (docs/quantised.md).

    T=1 is then timed again back to back, as plain decoding runs it, and that figure is kept: it is the
    price of plain decoding, the baseline of every replayed speedup. Even after a one-token pass, a
    one-token pass among the rounds reads dearer than in a run of them (q4: 9.1 against 8.1-8.6 ms;
    plain decoding measured 7.7 ms a token), and the replay then promised speedups that decoding did
    not keep."""
    from medusa_lib.decoding import run_base

    def one_pass(T: int) -> float:
        ids = np.zeros(T, dtype=np.int64)
        t = time.perf_counter()
        run_base(rt, ids, np.arange(prefix, prefix + T), rt.bias(T, prefix).zero_(), prefix)  # as the loop builds it
        return time.perf_counter() - t

    times = {int(T): [] for T in sizes}
    for _ in range(reps):
        for T in sizes:
            one_pass(T)  # untimed: the pass before has this width (and the first pass of a shape is a warm-up)
            times[int(T)].append(one_pass(T))
    if 1 in times:
        times[1] = [one_pass(1) for _ in range(reps)]
    return {T: float(np.median(ts)) for T, ts in times.items()}


PREFIX_WIDTHS = (1, 8)  # pass widths prefix_cost times on each prefix


def prefix_cost(rt, prefixes=(100, 600, 1200, 1900), widths=PREFIX_WIDTHS, reps: int = 15) -> dict[int, dict[int, float]]:
    """Milliseconds of a pass of T tokens on top of each prefix of cached tokens (median of `reps`,
    round-robin as in verify_cost_curve): how a graph's pass grows with the context it attends to."""
    from medusa_lib.decoding import run_base

    prefixes = [p for p in prefixes if p + max(widths) <= rt.capacity]

    def one_pass(p: int, T: int) -> float:
        t = time.perf_counter()
        run_base(rt, np.zeros(T, dtype=np.int64), np.arange(p, p + T), rt.bias(T, p).zero_(), p)
        return time.perf_counter() - t

    for p in prefixes:
        for T in widths:
            one_pass(p, T)
    times = {(p, T): [] for p in prefixes for T in widths}
    for _ in range(reps):
        for p, T in times:
            times[p, T].append(one_pass(p, T))
    return {p: {T: round(1e3 * float(np.median(times[p, T])), 3) for T in widths} for p in prefixes}


def graph_nodes_per_layer(export_dir: Path, num_layers: int) -> dict[str, float]:
    """Non-Constant nodes of each base graph of an export after ONNX Runtime's optimizer, divided by
    the layers (what is outside the layers, a handful of nodes, is counted in)."""
    import onnx
    import onnxruntime as ort

    info = read_json(Path(export_dir) / "export_info.json")
    counts = {}
    for graph, name in (("reference", info["files"]["base"]), ("fast", info["files"].get("base_fast"))):
        if not name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(str(Path(export_dir) / name), options, providers=["CPUExecutionProvider"])
            nodes = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
        counts[graph] = round(sum(n.op_type != "Constant" for n in nodes) / num_layers, 1)
    return counts


def final_accuracies(log_csv: str | Path, conditional: bool = True) -> np.ndarray:
    """(K, 5) eval top-1..5 accuracies at the last logged step: given a right path before each head
    (`cacc`, what a tree needs) when the log has them, else the plain ones."""
    import pandas as pd
    log = pd.read_csv(log_csv)
    ev = log[log.split == "eval"]
    last = ev[ev.step == ev.step.max()].sort_values("head")
    prefix = "cacc" if conditional and "cacc@1" in last and last["cacc@1"].notna().all() else "acc"
    return last[[f"{prefix}@{k}" for k in range(1, 6)]].to_numpy()


def heads_seconds(rt, tree: TreeBuffers | None = None, reps: int = 10, prefix: int = 200) -> float:
    """Seconds the heads cost a step, as the replay prices them: Medusa-1 / root-aware heads, their one
    call; sequential heads, their one call drafting `tree` (the menu a plan drafts from; default a
    one-node chain) divided by its depth, a price per depth. Median of `reps`, each timed as the
    decoding loop meets it: right after a verification pass. Timed back to back instead, a sequential
    heads call read 0.4-0.7 ms on the project's CPU against 1.0-1.1 ms a call in the benchmark's loop,
    and the replay priced its plans with the cheaper figure: the pass, streaming the base's weights,
    leaves the heads' weights out of the caches (tools/probes/heads_calls.py, docs/engine.md)."""
    from medusa_lib.decoding import propose, run_base

    tree = tree or build_tree(chain_paths(1), rt.info["topk"], rt.info["num_heads"])
    hidden = rt.hidden_buf[0, 0]  # (C,) what the pass below leaves there
    ids, positions = np.zeros(1, dtype=np.int64), np.arange(prefix, prefix + 1)
    bias = np.zeros((1, 1, 1, prefix + 1), dtype=rt.np_dtype)
    times = []
    for _ in range(reps + 1):  # the first call (the graph's first run) is not counted
        run_base(rt, ids, positions, bias, prefix)
        t = time.perf_counter()
        propose(rt, 0, hidden, tree)
        times.append(time.perf_counter() - t)
    per_depth = rt.info.get("token_inputs") == "path"
    return float(np.median(times[1:])) / (max(1, tree.heads_depth) if per_depth else 1)


# ----------------------------------------------------------------------------------------------
# Running methods

def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict:
    """The CPU by model name and the vector flags that decide its kernels (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def portable(path) -> str | None:
    """A path as a results file records it: relative to the repository, or to the data root
    ($WORKBOOK_DATA) as data/..., never an absolute path of the machine that ran it."""
    if path is None:
        return None
    path = Path(path).resolve()
    from medusa_lib.config import DATA_ENV
    roots = [(repo_root(), ""), (Path(os.environ.get(DATA_ENV, repo_root() / "data")).resolve(), "data/")]
    for root, prefix in roots:
        try:
            return prefix + str(path.relative_to(root))
        except ValueError:
            continue
    return f"(outside the repository)/{path.name}"


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _tree_plan(path: Path, num_heads: int) -> tuple:
    """A tree method's tree and its draft rule, if its file has one (tree.load_plan); a prompt-lookup
    section is hydra_pld's business and is not read here."""
    tree, kwargs = load_plan(path, num_heads)
    return tree, {k: v for k, v in kwargs.items() if k == "rule"}


class Methods:
    """Loads what each method needs once; `run(name, ids)` -> (tokens, decode_s, e2e_s, tau)."""

    def __init__(self, cfg: WorkbookConfig, methods, export_dir: Path, tree_file: Path, threads: int,
                 hydra_dir: Path | None = None, hydra_tree_file: Path | None = None, pld_file: Path | None = None,
                 quantised_plans: dict[str, Path] | None = None):
        import torch
        from medusa_lib.base import load_base
        from medusa_lib.decoding import load_runtime, with_heads_of

        self.cfg, self.methods = cfg, list(methods)
        bases = {split_method(m)[0] for m in self.methods}
        quantised = sorted({split_method(m)[1] for m in self.methods} - {"fp32"})
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.info = read_json(export_dir / "export_info.json")
        self.eos = self.info["eos_token_ids"]
        if {"hf", "hf_pld"} & set(self.methods):
            self.model, self.tokenizer = load_base(cfg.base_model, cfg.device, cfg.dtype)
        else:
            from transformers import AutoTokenizer
            from medusa_lib.base import checkpoint_path
            self.model, self.tokenizer = None, AutoTokenizer.from_pretrained(checkpoint_path(cfg.base_model))
        num_heads = self.info["num_heads"]
        self.lookup = {}  # method -> decoding.generate's plan arguments (lookup, draft rules) beside its tree
        self.trees = {"medusa_chain": build_tree(chain_paths(num_heads), self.info["topk"], num_heads)}
        if tree_file is not None:  # only medusa_tree reads it
            self.trees["medusa_tree"], self.lookup["medusa_tree"] = _tree_plan(tree_file, num_heads)
        hydra_info = read_json(hydra_dir / "export_info.json") if {"hydra_tree", "hydra_pld"} & bases else None
        if hydra_info is not None:
            self.trees["hydra_tree"], self.lookup["hydra_tree"] = _tree_plan(hydra_tree_file, hydra_info["num_heads"])
            self.trees["hydra_pld"] = self.trees["hydra_tree"]  # the hydra tree with the preset's chain, unless a plan says
            self.lookup["hydra_pld"] = {**self.lookup["hydra_tree"], "lookup": cfg.lookup_tokens}
            if pld_file is not None:
                self.trees["hydra_pld"], self.lookup["hydra_pld"] = load_plan(pld_file, hydra_info["num_heads"])
            for name, path in (quantised_plans or {}).items():  # "hydra_pld@q4": a plan sized for that graph
                self.trees[name], self.lookup[name] = load_plan(path, hydra_info["num_heads"])
        max_nodes = max(plan_size(t, **self.lookup.get(name, {})) for name, t in self.trees.items())
        self.max_nodes = max_nodes  # the widest pass any method may make
        self.runtimes = {}
        fp32 = any(m in ORT_METHODS and m != "ort_ref" for m in self.methods)  # a method on the fp32 fast or reference graph
        for weights in (["fp32"] if fp32 or not quantised else []) + quantised:
            at = "" if weights == "fp32" else "@" + weights  # one base session and cache per weight set
            rt = load_runtime(export_dir, cfg.kv_capacity, threads, max_nodes=max_nodes, weights=weights,
                              graph=cfg.base_graph if weights == "fp32" else "auto",
                              with_heads=any(m.startswith("medusa") and split_method(m)[1] == weights for m in self.methods))
            self.runtimes.update({name + at: rt for name in ("ort", "medusa_chain", "medusa_tree")})
            if hydra_info is not None:  # the same base session and cache, the sequential heads
                self.runtimes[f"hydra_tree{at}"] = self.runtimes[f"hydra_pld{at}"] = with_heads_of(rt, hydra_dir)
        self.rt = self.runtimes.get("ort") or next(iter(self.runtimes.values()))  # the graph the machine section describes
        if "ort_ref" in self.methods:  # the reference graph beside it: its own session and cache
            self.runtimes["ort_ref"] = load_runtime(export_dir, cfg.kv_capacity, threads, max_nodes=1, with_heads=False,
                                                    graph="reference")
        self._reference = None
        self.llama = None
        if "llamacpp" in self.methods:
            from llama_cpp import Llama
            from medusa_lib.base import embedded_gguf_path
            self.llama = Llama(model_path=str(embedded_gguf_path()), n_ctx=cfg.kv_capacity, n_threads=threads or os.cpu_count(),
                               verbose=False)

    def reference_model(self):
        """The base in Hugging Face in fp32 on the config's device, which judges a divergence from
        `ort` (loaded at the first one; the `hf` methods' model when that is already fp32)."""
        if self._reference is None:
            if self.model is not None and next(self.model.parameters()).dtype == self.torch.float32:
                self._reference = self.model
            else:
                from medusa_lib.base import load_base
                self._reference, _ = load_base(self.cfg.base_model, self.cfg.device, "float32")
        return self._reference

    def run(self, name: str, ids: list[int], max_new_tokens: int):
        from medusa_lib.decoding import generate
        torch = self.torch
        method = split_method(name)[0]
        if method in ORT_METHODS:
            t = time.perf_counter()
            plan = name if name in self.trees else method  # a plan of its own (quantised_plans), else the method's
            out, stats = generate(self.runtimes[name], ids, None if method in PLAIN_METHODS else self.trees[plan],
                                  max_new_tokens, eos_token_ids=self.eos, **self.lookup.get(plan, {}))
            return out, stats.decode_s, time.perf_counter() - t, stats.tau, stats
        if name in ("hf", "hf_pld"):
            x = torch.tensor([ids], device=self.model.device)
            with torch.no_grad():
                t = time.perf_counter()
                self.model(x)  # the prefill alone, to split decode time from end-to-end
                prefill = time.perf_counter() - t
                kwargs = {"prompt_lookup_num_tokens": PLD_TOKENS} if name == "hf_pld" else {}
                t = time.perf_counter()
                y = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id, **kwargs)
                e2e = time.perf_counter() - t
            out = y[0, len(ids):].tolist()
            return out, max(1e-9, e2e - prefill), e2e, (1.0 if name == "hf" else None), None
        if name == "llamacpp":
            self.llama.reset()
            t = time.perf_counter()
            out, first = [], t
            for tok in self.llama.generate(ids, temp=0.0, top_k=1, reset=True):
                if len(out) == 0:
                    first = time.perf_counter()
                out.append(int(tok))
                if tok in self.eos or len(out) >= max_new_tokens:
                    break
            end = time.perf_counter()
            return out, end - first, end - t, 1.0, None
        raise ValueError(f"Unknown method {name!r}: choose from {ALL_METHODS}.")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two outputs share before they first differ."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def agrees(ours: list[int], ours_stopped: str | None, reference: list[int], reference_stopped: str | None) -> bool:
    """Whether a method's greedy output equals the reference's. A reply cut short because its next
    pass no longer fit the KV cache (stopped "capacity") is compared over the tokens both produced:
    a stop for room is not a different token."""
    if "capacity" in (ours_stopped, reference_stopped):
        n = min(len(ours), len(reference))
        return ours[:n] == reference[:n]
    return ours == reference


def divergence(model, prompt: list[int], ours: list[int], reference: list[int]) -> dict:
    """Where two greedy outputs first differ, and the gap between the base's top two logits there
    (Hugging Face, fp32): a gap near zero means a near-tie that rounding can flip."""
    import torch
    pos = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reference[:pos]], device=model.device)).logits[0, -1].float()
    top = logits.topk(2).values
    return {"position": pos, "top2_gap": float(top[0] - top[1])}


def _aggregate(records: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in records)
    decode = sum(r["decode_s"] for r in records)
    e2e = sum(r["e2e_s"] for r in records)
    lens = [L for r in records for L in (r.get("accept_lens") or [])]
    if lens:  # pooled over every step (tokens per step, as the paper counts), not a mean of per-prompt means
        tau = (sum(lens) + len(lens)) / len(lens)
    else:  # methods without steps of their own: 1.0 (one token a pass) or None (unknown)
        taus = [r["tau"] for r in records if r["tau"] is not None]
        tau = float(np.mean(taus)) if taus else None
    steps = sum(r.get("steps") or 0 for r in records)
    base = sum(r.get("base_s") or 0.0 for r in records)
    return {"prompts": len(records), "new_tokens": tokens, "decode_tok_per_s": tokens / decode if decode else 0.0,
            "e2e_tok_per_s": tokens / e2e if e2e else 0.0, "tau": tau,
            "identical_to_ort": sum(r["identical_to_ort"] for r in records if r["identical_to_ort"] is not None),
            # the lossless check: the same output as plain decoding on the same graph (ort, or ort@<weights>)
            "identical_to_plain": (sum(r["identical_to_plain"] for r in records)
                                   if records and "identical_to_plain" in records[0] else None),
            **({"identical_to_llamacpp": sum(r["identical_to_llamacpp"] for r in records),
                "common_prefix_with_llamacpp": float(np.mean([r["common_prefix_with_llamacpp"] for r in records]))}
               if records and "identical_to_llamacpp" in records[0] else {}),
            "capacity_stops": sum(r.get("stopped") == "capacity" for r in records),  # replies cut for KV room
            # per step of the decoding loop: inside the base graph's run (ORT) and everything else (heads, host)
            "base_ms_per_step": 1e3 * base / steps if steps else None,
            "host_ms_per_step": 1e3 * (decode - base) / steps if steps else None}


def measure_memory(method: str, cfg_name: str, export_dir: Path, tree_file: Path, threads: int, max_new_tokens: int,
                   hydra_dir: Path | None = None, hydra_tree_file: Path | None = None, pld_file: Path | None = None) -> float:
    """Peak resident memory (MB) of a fresh process that loads only `method` and runs one prompt."""
    args = [method, cfg_name, str(export_dir), str(tree_file) if tree_file else None, threads, max_new_tokens,
            *(str(f) if f else None for f in (hydra_dir, hydra_tree_file, pld_file))]
    code = f"import json; from medusa_lib.bench import _memory_child; print(json.dumps(_memory_child(*{args!r})))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    try:
        return float(json.loads(res.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return float("nan")


def _memory_child(method, cfg_name, export_dir, tree_file, threads, max_new_tokens, hydra_dir, hydra_tree_file, pld_file) -> float:
    cfg = get_config(cfg_name)
    m = Methods(cfg, [method], Path(export_dir), Path(tree_file) if tree_file else None, threads, *(Path(f) if f else None for f in
                (hydra_dir, hydra_tree_file, pld_file)))
    q = load_questions(None, cfg, 1)[0]
    m.run(method, prompt_ids(m.tokenizer, q), max_new_tokens)
    return peak_rss_mb()


def check_out_path(out: str | Path) -> Path:
    """Fail before a long run, not after it: `out` must be a file path we can write."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: give a file name, e.g. {out / 'results.json'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise PermissionError(f"--out {out} cannot be written ({err.strerror}): choose a writable folder.") from None
    return out


def hydra_paths_for(cfg: WorkbookConfig, hydra_tree: str | Path | None, hydra_heads: str | Path | None = None) -> tuple[Path, Path]:
    """The sequential heads' export (data/<preset>/hydra/onnx, or `hydra_heads`' export, exported on
    first use) and tree."""
    from medusa_lib.train import run_dir

    export_dir = resolve_export_dir(cfg, hydra_heads or run_dir(hydra_config(cfg)))
    return export_dir, Path(hydra_tree) if hydra_tree else default_tree_file(cfg, sequential=True)


def reuse_heads(cfg: WorkbookConfig, source: str | Path) -> dict[str, Path]:
    """Heads trained under another preset's folder (`--heads-from data/full`), for benchmarking them
    with this preset's runtime settings (the GPU measurement: the `full` heads on the `gpu` preset's
    fp16 graphs, CUDA provider and tree size) without training again. The Medusa-1 and the sequential
    checkpoints are copied into data/<preset>/heads-from-<source>/ (never into the preset's own heads
    folders, which notebook 02 owns), and notebook 03's rule builds each one's tree there: cfg.tree_nodes
    nodes, greedy on the accuracies in the heads' log.csv. What is there already is kept.
    Returns the benchmark's arguments: heads, hydra_heads, tree, hydra_tree."""
    from medusa_lib.tree import expected_tau, greedy_tree, rank_accuracy

    source = Path(source)
    target = cfg.data_dir / f"heads-from-{source.resolve().name}"
    args = {}
    from medusa_lib.heads import checkpoint_fingerprint

    for kind, arg, tree_arg in (("heads", "heads", "tree"), ("hydra", "hydra_heads", "hydra_tree")):
        src, dst = source / kind, target / kind
        tree = target / "trees" / f"{'tree_hydra' if kind == 'hydra' else 'tree'}.json"
        if (dst / "heads_config.json").is_file() and (src / "heads_config.json").is_file() \
                and checkpoint_fingerprint(src) != checkpoint_fingerprint(dst):  # the source was trained again since
            print(f"{src} changed since it was copied to {dst}: copying it again (its export and tree are made anew).")
            shutil.rmtree(dst)
            tree.unlink(missing_ok=True)
        if not (dst / "heads_config.json").is_file():
            missing = [n for n in ("heads_config.json", "heads.safetensors", "log.csv") if not (src / n).is_file()]
            if missing:
                raise FileNotFoundError(f"--heads-from {source}: {src} lacks {missing}; point to a preset's data folder "
                                        f"whose notebook 02 has trained both kinds of heads (e.g. data/full).")
            tmp = dst.with_name(dst.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for n in ("heads_config.json", "heads.safetensors", "log.csv"):
                shutil.copy2(src / n, tmp / n)
            os.replace(tmp, dst)
        if not tree.is_file():
            rank_acc = rank_accuracy(final_accuracies(dst / "log.csv"))
            paths = greedy_tree(rank_acc, cfg.tree_nodes)
            save_tree(tree, paths, cfg.topk, heads=dst, expected_tau=expected_tau(paths, rank_acc),
                      source=f"notebook 03's rule ({cfg.tree_nodes} nodes) on {src}")
        args[arg], args[tree_arg] = dst, tree
    return args


def pld_plan_file(cfg: WorkbookConfig, pld_plan: str | Path | None) -> Path | None:
    """hydra_pld's plan: the file given, else notebook 06's (trees/tree_hydra_pld_device.json), else
    None (the hydra tree with the preset's lookup_tokens)."""
    if pld_plan:
        if not Path(pld_plan).is_file():
            raise FileNotFoundError(f"--pld-plan {pld_plan} does not exist (a tree file with a 'lookup' section, from notebook 06).")
        return Path(pld_plan)
    path = cfg.data_dir / "trees" / "tree_hydra_pld_device.json"
    return path if path.is_file() else None


def quantised_plan_files(cfg: WorkbookConfig, methods, given: dict[str, str] | None = None) -> dict[str, Path]:
    """hydra_pld@<weights>'s plan, per quantised graph raced: the file given for those weights, else notebook
    06's (trees/tree_hydra_pld_<weights>.json); without one, hydra_pld's plan serves, cut to chains."""
    given, plans = dict(given or {}), {}
    for weights, path in given.items():
        if weights not in WEIGHTS[1:] or not Path(path).is_file():
            raise FileNotFoundError(f"--quantised-plan {weights}={path}: name int8 or q4 and an existing plan file "
                                    f"(notebook 06 writes trees/tree_hydra_pld_<weights>.json).")
        if f"hydra_pld@{weights}" not in methods:  # a plan no method reads would be silently ignored
            raise ValueError(f"--quantised-plan {weights}=... given, but hydra_pld@{weights} is not among the methods "
                             f"{list(methods)}: add it or leave the flag out.")
    for name in methods:
        method, weights = split_method(name)
        if method == "hydra_pld" and weights != "fp32":
            path = Path(given[weights]) if weights in given else cfg.data_dir / "trees" / f"tree_hydra_pld_{weights}.json"
            if path.is_file():
                plans[name] = path
    return plans


def run_benchmark(cfg: WorkbookConfig, questions: str | None = None, limit: int | None = None,
                  max_new_tokens: int | None = None, methods=None, tree_file: str | None = None,
                  heads: str | None = None, threads: int | None = None, memory: bool = True,
                  progress: bool = True, hydra_tree: str | None = None, pld_plan: str | None = None,
                  hydra_heads: str | None = None, quantised_plans: dict[str, str] | None = None) -> dict:
    from tqdm.auto import tqdm

    limit = cfg.bench_prompts if limit is None else limit
    max_new_tokens = cfg.bench_max_new_tokens if max_new_tokens is None else max_new_tokens
    if limit < 1 or max_new_tokens < 1:
        raise ValueError(f"The benchmark needs at least one prompt and one new token (limit={limit}, "
                         f"max_new_tokens={max_new_tokens}).")
    threads = cfg.threads if threads is None else threads
    methods = [m.strip() for m in (methods or cfg.bench_methods)]
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"The methods name {', '.join(twice)} more than once: list each method once.")
    unknown = [m for m in methods if not method_known(m)]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}: choose from {ALL_METHODS}; those of {ORT_METHODS[:1] + ORT_METHODS[2:]} "
                         f"also on a quantised base as method@int8 or method@q4.")
    notes = []
    if "llamacpp" in methods and importlib.util.find_spec("llama_cpp") is None:
        methods.remove("llamacpp")
        notes.append("llamacpp skipped: llama-cpp-python is not installed (pip install llama-cpp-python).")
    bases = {split_method(m)[0] for m in methods}  # the methods without their graphs' weights
    unused = [flag for flag, given, users in (("--tree", tree_file, {"medusa_tree"}),
                                              ("--hydra-tree", hydra_tree, {"hydra_tree", "hydra_pld"}),
                                              ("--pld-plan", pld_plan, {"hydra_pld"}),
                                              ("--hydra-heads", hydra_heads, {"hydra_tree", "hydra_pld"}))
              if given and not users & bases]
    if unused:  # a setting no chosen method reads would be silently ignored
        raise ValueError(f"{', '.join(unused)} given, but no method in {methods} uses it: add the method that reads it "
                         f"(--tree: medusa_tree; --hydra-tree, --hydra-heads: hydra_tree or hydra_pld; --pld-plan: hydra_pld) "
                         f"or leave the flag out.")
    export_dir = resolve_export_dir(cfg, heads)
    tree_file = (Path(tree_file) if tree_file else default_tree_file(cfg)) if "medusa_tree" in bases else None
    hydra_dir = hydra_tree_file = pld_file = None
    if {"hydra_tree", "hydra_pld"} & bases:
        hydra_dir, hydra_tree_file = hydra_paths_for(cfg, hydra_tree, hydra_heads)
        pld_file = pld_plan_file(cfg, pld_plan) if "hydra_pld" in bases else None
    export_info = read_json(export_dir / "export_info.json")
    for weights in sorted({split_method(m)[1] for m in methods} - {"fp32"}):  # a graph the export lacks is skipped, said
        if not export_info["files"].get(f"base_fast_{weights}"):
            skipped = [m for m in methods if split_method(m)[1] == weights]
            methods = [m for m in methods if m not in skipped]
            why = export_info.get("quantised", {}).get(weights, {}).get("skipped", "exported before quantised graphs existed; re-export")
            notes.append(f"{', '.join(skipped)} skipped: {portable(export_dir)} has no {weights} graph ({why}).")
    q_plans = quantised_plan_files(cfg, methods, quantised_plans)
    for export, files in ((export_dir, [tree_file]), (hydra_dir, [hydra_tree_file, pld_file, *q_plans.values()])):
        made = read_json(export / "export_info.json").get("heads_fingerprint") if export else None
        for file in (f for f in files if f is not None and Path(f).is_file()):
            check_sized_for(file, made)  # a tree or plan sized for heads trained again since is refused
    for plain in dict.fromkeys(plain_of(m) for m in ["ort", *methods] if plain_of(m)):  # each graph's plain decoding judges its methods
        if plain not in methods:
            methods.insert(0 if plain == "ort" else methods.index("ort") + 1, plain)
    if questions is None:
        questions = questions_path(cfg.bench_questions)
    qs = load_questions(questions, cfg, limit)
    runner = Methods(cfg, methods, export_dir, tree_file, threads, hydra_dir, hydra_tree_file, pld_file, q_plans)
    warm = prompt_ids(runner.tokenizer, {"turns": ["Hello!"]})
    for name in methods:  # warm-up, excluded from timing
        runner.run(name, warm, 8)
    per_method = defaultdict(list)
    split = defaultdict(lambda: defaultdict(float))  # method -> where its decode time went
    divergences = []
    bar = tqdm(total=len(qs) * len(methods), desc="benchmark", disable=not progress)
    for i, q in enumerate(qs):
        ids = prompt_ids(runner.tokenizer, q)
        if len(ids) + runner.max_nodes > cfg.kv_capacity:  # refused before any method runs; the other prompts go on
            notes.append(f"question {q['question_id']} skipped: its {len(ids)}-token prompt and a {runner.max_nodes}-token "
                         f"pass do not fit kv_capacity={cfg.kv_capacity}; raise kv_capacity to include it.")
            bar.update(len(methods))
            continue
        order = methods[i % len(methods):] + methods[: i % len(methods)]  # alternate who goes first
        outputs = {}
        for name in order:
            out, decode_s, e2e_s, tau, stats = runner.run(name, ids, max_new_tokens)
            outputs[name] = out
            per_method[name].append({"category": q["category"], "new_tokens": len(out), "decode_s": decode_s,
                                     "e2e_s": e2e_s, "tau": tau, "accept_lens": stats.accept_lens if stats else None,
                                     "tokens": out, "steps": stats.steps if stats else None,
                                     "base_s": stats.base_s if stats else None, "stopped": stats.stopped if stats else None})
            if drafts(name) and stats is not None:
                for k, v in stats.split_s.items():
                    split[name][k] += v
                split[name]["python"] += stats.python_s
                split[name]["decode_total"] += stats.decode_s
            bar.update(1)
        for name in methods:
            record_ = per_method[name][-1]
            for other, key in (("ort", "identical_to_ort"), (plain_of(name), "identical_to_plain"), ("llamacpp", "identical_to_llamacpp")):
                if other in outputs:
                    record_[key] = agrees(outputs[name], record_["stopped"], outputs[other], per_method[other][-1]["stopped"])
            if "llamacpp" in outputs:
                record_["common_prefix_with_llamacpp"] = common_prefix(outputs[name], outputs["llamacpp"])
            if not record_.get("identical_to_plain", record_["identical_to_ort"]) and split_method(name)[1] == "fp32":
                divergences.append({"method": name, "question_id": q["question_id"],
                                    **divergence(runner.reference_model(), ids, outputs[name], outputs["ort"])})
            elif not record_.get("identical_to_plain", True):  # a quantised graph: no fp32 model judges its near-ties
                divergences.append({"method": name, "question_id": q["question_id"], "from_token": common_prefix(
                    outputs[name], outputs[plain_of(name)])})
    bar.close()
    mem = {}
    if memory:
        for name in methods:
            mem[name] = measure_memory(name, cfg.name, export_dir, tree_file, threads, min(16, max_new_tokens),
                                       hydra_dir, hydra_tree_file, pld_file)
    result = {"methods": {}, "categories": {}, "time_split": {k: dict(v) for k, v in split.items()}, "notes": notes,
              "divergences_from_ort": divergences,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), **cpu_description(), "provider": runner.rt.base.get_providers()[0],
                          "gpu": runner.torch.cuda.get_device_name(0) if runner.rt.device.type == "cuda" else None,
                          "graph_dtype": runner.info["dtype"], "base_graph": runner.rt.graph,
                          "nodes_per_layer": graph_nodes_per_layer(export_dir, runner.info["num_layers"])},
              "settings": {"preset": cfg.name, "prompts": len(per_method["ort"]), "prompts_skipped": len(qs) - len(per_method["ort"]), "max_new_tokens": max_new_tokens,
                           "questions": portable(questions) if questions else "held-out ShareGPT (eval split)",
                           "export_dir": portable(export_dir), "hydra_export_dir": portable(hydra_dir),
                           "tree_file": portable(tree_file), "tree_nodes": runner.trees["medusa_tree"].size if tree_file else None, "threads": threads,
                           "hydra_tree_file": portable(hydra_tree_file),
                           "hydra_tree_nodes": runner.trees["hydra_tree"].size if hydra_tree_file else None,
                           "hydra_pld_plan": portable(pld_file),
                           "quantised_plans": {name: portable(path) for name, path in q_plans.items()},
                           "plans": {name: {k: (v.size if k == "lookup_tree" else dataclasses.asdict(v) if k.endswith("rule") else v)
                                            for k, v in plan.items()} for name, plan in runner.lookup.items() if name in bases}}}
    uses = {"ort": {"export": portable(export_dir), "graph": runner.rt.graph},
            "ort_ref": {"export": portable(export_dir), "graph": "reference"},
            "medusa_chain": {"export": portable(export_dir), "tree": f"chain of {runner.info['num_heads']}"},
            "medusa_tree": {"export": portable(export_dir), "tree": portable(tree_file)},
            "hydra_tree": {"export": portable(hydra_dir), "tree": portable(hydra_tree_file)},
            "hydra_pld": {"export": portable(hydra_dir), "plan": portable(pld_file) or portable(hydra_tree_file)},
            "llamacpp": {"gguf": "the embedded base's GGUF file", "build": "make llamacpp (portable AVX2 build)"}}
    for name in methods:  # a quantised graph's methods: the same plan, chains only (decoding.generate)
        method, weights = split_method(name)
        if weights != "fp32":
            uses[name] = {**uses[method], "graph": "fast", "weights": weights,
                          "weight_error": runner.info.get("quantised", {}).get(weights),
                          **({} if method in PLAIN_METHODS else {"decodes": "each step's tree cut to a chain"}),
                          **({"plan": portable(q_plans[name])} if name in q_plans else {})}
    if not per_method["ort"]:
        raise ValueError(f"No prompt fits kv_capacity={cfg.kv_capacity}: " + " ".join(notes))
    base_speed = _aggregate(per_method["ort"])["decode_tok_per_s"]
    for name in methods:
        agg = _aggregate(per_method[name])
        plain_speed = _aggregate(per_method[plain_of(name)])["decode_tok_per_s"] if plain_of(name) else None
        agg.update(peak_rss_mb=mem.get(name), speedup_vs_ort=agg["decode_tok_per_s"] / base_speed if base_speed else None,
                   speedup_vs_plain=agg["decode_tok_per_s"] / plain_speed if plain_speed else None, uses=uses.get(name))
        result["methods"][name] = agg
    for cat in sorted({r["category"] for r in per_method["ort"]}):
        result["categories"][cat] = {}
        ort_cat = _aggregate([r for r in per_method["ort"] if r["category"] == cat])["decode_tok_per_s"]
        for name in methods:
            agg = _aggregate([r for r in per_method[name] if r["category"] == cat])
            agg.update(peak_rss_mb=mem.get(name), speedup_vs_ort=agg["decode_tok_per_s"] / ort_cat if ort_cat else None)
            result["categories"][cat][name] = agg
    result["accept_lens"] = {n: sum((r["accept_lens"] or [] for r in per_method[n]), []) for n in methods
                             if drafts(n)}
    return result


def default_tree_file(cfg: WorkbookConfig, sequential: bool = False) -> Path:
    """The device-sized tree from notebook 06 if there is one, else notebook 03's tree (for the
    Medusa-1 heads, or for the sequential heads)."""
    stem = "tree_hydra" if sequential else "tree"
    for path in (cfg.data_dir / "trees" / f"{stem}_device.json", cfg.data_dir / "trees" / f"{stem}.json"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"No tree in {cfg.data_dir / 'trees'}: run notebook 03 (loss analysis) first, or pass --tree FILE.")


def results_table(result: dict):
    import pandas as pd
    cols = ["prompts", "new_tokens", "decode_tok_per_s", "e2e_tok_per_s", "peak_rss_mb", "tau", "speedup_vs_ort", "speedup_vs_plain",
            "identical_to_plain", "identical_to_ort", "identical_to_llamacpp", "base_ms_per_step", "host_ms_per_step"]
    frame = pd.DataFrame(result["methods"]).T
    return frame[[c for c in cols if c in frame]]  # results files written before a column existed lack it


def _pairs(flag: str, values: list[str] | None) -> dict[str, str]:
    bad = [v for v in values or [] if "=" not in v]
    if bad:
        raise ValueError(f"{flag} {bad[0]}: write WEIGHTS=FILE, e.g. {flag} q4=data/full/trees/tree_hydra_pld_q4.json.")
    return dict(v.split("=", 1) for v in values or [])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark Medusa on ONNX Runtime against its peers.")
    p.add_argument("--preset"); p.add_argument("--questions"); p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int); p.add_argument("--methods", help=f"comma-separated, from {ALL_METHODS}")
    p.add_argument("--tree", help="medusa_tree's tree file; a 'rule' section in it (notebook 06's plan) drafts by that rule "
                   "(default: data/<preset>/trees/tree*.json)")
    p.add_argument("--heads", help="heads checkpoint folder (exported on first use) or exported ONNX folder")
    p.add_argument("--hydra-tree", help="hydra_tree's tree file, with its 'rule' section if any (default: "
                   "data/<preset>/trees/tree_hydra*.json)")
    p.add_argument("--pld-plan", help="hydra_pld's tree file with a 'lookup' section (default: trees/tree_hydra_pld_device.json)")
    p.add_argument("--quantised-plan", action="append", metavar="WEIGHTS=FILE", help="hydra_pld@WEIGHTS's plan (default: "
                   "trees/tree_hydra_pld_<weights>.json from notebook 06), e.g. q4=data/full/trees/tree_hydra_pld_q4.json")
    p.add_argument("--threads", type=int); p.add_argument("--out"); p.add_argument("--no-memory", action="store_true")
    p.add_argument("--hydra-heads", help="sequential heads checkpoint or export folder (default: data/<preset>/hydra)")
    p.add_argument("--heads-from", help="a data folder of another preset (e.g. data/full): benchmark its trained heads with this "
                   "preset's settings, on trees of this preset's size (see reuse_heads)")
    p.add_argument("--cost-curve", action="store_true", help="also measure ms per verification pass at the preset's cost_curve_sizes")
    a = p.parse_args(argv)
    cfg = get_config(a.preset)
    out = check_out_path(a.out if a.out else cfg.data_dir / "bench" / "results.json")
    if a.heads_from:
        reused = reuse_heads(cfg, a.heads_from)
        a.heads, a.hydra_heads = a.heads or reused["heads"], a.hydra_heads or reused["hydra_heads"]
        a.tree, a.hydra_tree = a.tree or reused["tree"], a.hydra_tree or reused["hydra_tree"]
    if a.methods is not None and not [m for m in a.methods.split(",") if m.strip()]:
        raise ValueError(f"--methods is empty: name at least one of {ALL_METHODS}, or leave the flag out for the preset's methods.")
    result = run_benchmark(cfg, a.questions, a.limit, a.max_new_tokens, a.methods.split(",") if a.methods else None,
                           a.tree, a.heads, a.threads, memory=not a.no_memory, hydra_tree=a.hydra_tree, pld_plan=a.pld_plan,
                           hydra_heads=a.hydra_heads,
                           quantised_plans=_pairs("--quantised-plan", a.quantised_plan))
    if a.heads_from:
        result["settings"]["heads_from"] = portable(a.heads_from)
    if a.cost_curve:  # the graph decoding used, the reference graph, and each quantised graph raced, one at a time
        from medusa_lib.decoding import load_runtime
        raced = sorted({split_method(m)[1] for m in result["methods"]} - {"fp32"})
        for key, graph, weights in (("", cfg.base_graph, "fp32"), ("_reference", "reference", "fp32"),
                                    *((f"@{w}", "auto", w) for w in raced)):
            rt = load_runtime(resolve_export_dir(cfg, a.heads), cfg.kv_capacity, cfg.threads if a.threads is None else a.threads,
                              max_nodes=max(*cfg.cost_curve_sizes, *PREFIX_WIDTHS), with_heads=False, graph=graph,
                              weights=weights)
            result[f"cost_curve_ms{key}"] = {T: round(s * 1e3, 3) for T, s in verify_cost_curve(rt, cfg.cost_curve_sizes).items()}
            result[f"prefix_cost_ms{key}"] = prefix_cost(rt)
            held = weights if weights != "fp32" else rt.info["dtype"]  # fp32 weights, or in an fp16 export fp16
            print(f"ms per verification pass ({rt.graph} graph, {held}):", result[f"cost_curve_ms{key}"])
            print(f"ms per pass of 1 and 8 tokens by cached tokens ({rt.graph} graph, {held}):", result[f"prefix_cost_ms{key}"])
            del rt
    import pandas as pd
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(results_table(result).to_string(float_format=lambda x: f"{x:.2f}"))
    for note in result["notes"]:
        print(note)
    write_json(out, result)
    print(f"results written to {out}")


if __name__ == "__main__":
    from medusa_lib.cli import run_cli
    run_cli(main)
