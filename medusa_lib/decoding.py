"""Medusa decoding on ONNX Runtime with tree attention (paper sections 2.1-2.3).

One step, with n tokens already in the KV cache (docs/design.md, "One decoding step"):
  1 prefill   the prompt fills the cache (once)
  2 propose   root = the base's next token; candidates = each head's top-k; tree tokens
  3 verify    one base forward of the N tree tokens under the tree mask
  4 accept    the longest candidate path the base agrees with (greedy) or finds typical
  5 compact   the accepted rows move to cache positions n..n+L; the rest is overwritten later
The cache is one preallocated tensor (torch, on the ORT device) bound with IO binding: ORT reads
the first n rows in place and writes the new rows in place, so no step copies the cache.
With no tree (or no heads) the same loop is plain greedy decoding, one token per pass.

Two base graphs run under the same five steps (docs/engine.md): the reference graph of notebook 04
(export.TreeStep, traced op by op; cache rows sequence-major) and the fast graph (fast_graph.py,
ONNX Runtime's fused operators; cache head-major, bound once per pass width). `graph="auto"` takes
the fast one where the export has it and the provider runs it, and says so when it cannot.
`weights="int8"` or `"q4"` runs the fast graph with quantised weights (quant.py, docs/quantised.md).

    rt = load_runtime("data/onnx", capacity=2048)
    tokens, stats = generate(rt, prompt_ids, tree, max_new_tokens=128)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from medusa_lib.export import BASE_FILE, EMBED_FILE, INFO_FILE, MASKED, TreeStep, causal_bias, io_names, kv_shape, read_export_info
from medusa_lib.fast_graph import SPARE_ROWS, fast_io_names, max_positions_of
from medusa_lib.quant import WEIGHTS
from medusa_lib.tree import PAD, DraftRule, TreeBuffers, check_lookup, grow_draft, prompt_lookup, subtree, top_chain, with_lookup
from medusa_lib.tree_heads import TreeHeads

TYPICAL_EPS = 0.09  # epsilon and alpha of typical acceptance (Medusa paper, section 2.3.1)
TYPICAL_ALPHA = 0.3
ENTROPY_EPS = 1e-5  # entropy = -sum p log(p + 1e-5), as upstream Medusa computes it


@dataclass
class OrtRuntime:
    base: ort.InferenceSession
    heads: list[ort.InferenceSession]  # [] (plain decoding), [all heads], or one per head (sequential heads)
    embed: np.ndarray | None  # (V, C) the base's input embeddings, for heads that see tokens
    info: dict
    device: torch.device
    capacity: int
    cache: torch.Tensor  # keys and values interleaved: (2L, 1, capacity, kv_heads, head_dim) for the reference
    # graph, (2L, 1, kv_heads, capacity, head_dim) for the fast graph (GroupQueryAttention's layout)
    logits_buf: torch.Tensor  # (1, max_nodes, V)
    hidden_buf: torch.Tensor  # (1, max_nodes, C)
    np_dtype: type
    names_in: list[str]
    names_out: list[str]
    graph: str = "reference"  # or "fast"
    weights: str = "fp32"  # or "int8", "q4" (quant.py; fast graph only). Their kernels round the
    # activations to int8, which turns the last-bit differences of a tree's row layout into visibly different
    # logits; a chain pass computes every row bit for bit as plain decoding does, so on these graphs generate
    # cuts each step's tree to a chain: its top-ranked chain, or the prompt-lookup chain alone (docs/quantised.md)
    bias_buf: torch.Tensor | None = None  # (max_nodes * capacity,) where each step's attention bias is written
    step_buf: torch.Tensor | None = None  # fast graph: (2, max_nodes) int64 ids and positions of a pass
    seq_buf: torch.Tensor | None = None  # fast graph: (2,) int32 seqlens_k = n+T-1, total_sequence_length = n+T
    bindings: dict = field(default_factory=dict)  # fast graph: pass width T -> its IO binding (cache bound once)
    tree_heads: dict = field(default_factory=dict)  # sequential heads: a tree's paths -> its TreeHeads (one call a step)
    heads_options: ort.SessionOptions | None = None  # how the heads' sessions (and TreeHeads) are made
    heads_dir: Path | None = None  # the export the heads come from
    base_s: list = field(default_factory=lambda: [0.0])  # seconds inside the base graph's runs (ORT), summed

    def token_rows(self) -> torch.Tensor:
        """The cache as (2L, capacity, kv_heads, head_dim), token rows first, whichever graph's layout
        holds it: a view, so what is written to it lands in the cache."""
        return self.cache[:, 0].transpose(1, 2) if self.graph == "fast" else self.cache[:, 0]

    def kv_rows(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of cache tensor j (2*layer for keys, +1 for values): (rows, kv_heads, head_dim), a view."""
        return self.token_rows()[j, start:stop]

    def bias(self, T: int, n: int) -> torch.Tensor:
        """A (1, 1, T, n+T) view of the preallocated bias buffer (contents left as they are)."""
        return self.bias_buf[: T * (n + T)].view(1, 1, T, n + T)


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # verification passes after the prefill
    accept_lens: list[int] = field(default_factory=list)  # L per step (tokens emitted = L + 1)
    pass_sizes: list[int] = field(default_factory=list)  # tokens T of each step's verification pass
    prefill_s: float = 0.0
    decode_s: float = 0.0
    split_s: dict = field(default_factory=lambda: {"verify": 0.0, "heads": 0.0, "accept": 0.0, "compact": 0.0})
    base_s: float = 0.0  # of decode_s, the time inside the base graph's runs (the rest is the host's: heads, numpy, Python)
    stopped: str = "max_new_tokens"  # or "eos", "capacity"

    @property
    def tau(self) -> float:
        return (sum(self.accept_lens) + len(self.accept_lens)) / max(1, len(self.accept_lens))

    @property
    def decode_tok_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def python_s(self) -> float:
        """Decode time outside ORT and the step functions' own work: the loop's Python share."""
        return max(0.0, self.decode_s - sum(self.split_s.values()))


# ----------------------------------------------------------------------------------------------
# Runtime

def execution_providers(provider: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu is installed and a GPU is usable, else CPU (and no CUDA attempt)."""
    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cuda":
        raise RuntimeError("provider='cuda' needs onnxruntime-gpu and a visible GPU; neither CPU fallback was asked for.")
    return ["CPUExecutionProvider"]


def _session_options(threads: int = 0, spin: bool = False) -> ort.SessionOptions:
    """Options of a session with its own pool of `threads` (0 = one per core). With `spin`, its workers
    spin while a run lasts (no sleep and wake between operators) and stop when it returns, so the next
    session to run, the heads after the base or the base after the heads, has the cores to itself."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1" if spin else "0")
    return options


# Threads on the CPU (docs/engine.md). The base and the heads each get a pool of one thread per core
# whose workers spin while a run lasts and stop when it returns. Measured on 2 cores (Intel Xeon, fast
# graph): spinning took plain decoding from 39 to 48 tok/s; heads on 2 threads of their own beside a
# base whose workers kept spinning after its runs halved hydra_pld (27 tok/s); heads on the caller's
# thread alone took 3.2 ms a step after a pass, on 2 threads with the base's spinning stopped 2.0-2.2 ms
# (tools/probes/heads_calls.py).


def _session(path: Path, options, providers) -> ort.InferenceSession:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: re-export (notebook 04, or --heads DIR exports a checkpoint).")
    # fp32 graphs stay fp32 on a GPU: ORT's CUDA provider otherwise rounds matmul inputs to TF32 (a 10-bit
    # mantissa), and a wide verification pass would then round differently from a one-token pass
    providers = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # ORT raises its own exception types for a damaged protobuf
        raise ValueError(f"{path} cannot be loaded by ONNX Runtime ({str(err).splitlines()[0][:200]}): the file is "
                         f"damaged or truncated; re-export (notebook 04).") from None


GRAPHS = ("auto", "fast", "reference")


def _fast_session(export_dir: Path, info: dict, graph: str, capacity: int, options, providers,
                  weights: str = "fp32") -> ort.InferenceSession | None:
    """The fast graph's session, or None (with the reason said) where the reference graph must serve:
    an export without it, an fp32 export on the CUDA provider (GroupQueryAttention has no fp32 kernel
    there; an fp16 export carries an fp16 fast graph), a capacity beyond its rotary tables, or an ONNX
    Runtime that lacks its operators or rejects an input of them (tried on one pass: `_fast_graph_runs`).
    Quantised weights exist on the fast graph only, so for them each of these is an error instead."""
    name = info["files"].get("base_fast" if weights == "fp32" else f"base_fast_{weights}")
    why = None
    if not name:
        note = info.get("fast_graph", "exported before the fast graph existed; re-export") if weights == "fp32" else \
            info.get("quantised", {}).get(weights, {}).get("skipped", "exported before quantised graphs existed; re-export")
        why = f"{export_dir} has no fast graph{'' if weights == 'fp32' else ' with ' + weights + ' weights'} ({note})"
    elif providers[0] == "CUDAExecutionProvider" and info.get("dtype") != "float16":
        why = ("GroupQueryAttention runs in fp16/bf16 only on ONNX Runtime's CUDA provider, and the graphs are fp32 "
               "(the lossless choice; an export with export_dtype 'float16' carries an fp16 fast graph)")
    else:
        try:
            session = ort.InferenceSession(str(export_dir / name), options, providers=providers)
        except Exception as err:  # an ORT without com.microsoft.GroupQueryAttention's inputs, or a damaged file
            why = f"ONNX Runtime {ort.__version__} cannot load {export_dir / name} ({str(err).splitlines()[0][:160]})"
        else:
            if capacity > max_positions_of(session):
                why = f"kv capacity {capacity} exceeds the {max_positions_of(session)} positions of its rotary tables"
            else:
                why = _fast_graph_runs(session, export_dir / name)
            if why is None:
                return session
    if weights != "fp32":
        raise RuntimeError(f"weights={weights!r} cannot run: {why}. The quantised weights live in the fast graph only: "
                           f"re-export (notebook 04) or use weights='fp32'.")
    if graph == "fast":
        raise RuntimeError(f"graph='fast' cannot run: {why}. Use graph='auto' (falls back to the reference graph).")
    warnings.warn(f"Fast base graph not used: {why}; decoding with the reference graph (slower, same outputs).",
                  stacklevel=3)
    return None


def _fast_graph_runs(session: ort.InferenceSession, path: Path) -> str | None:
    """None when `session` (a fast graph) runs a pass of two tree tokens on two cached rows; else why
    not. A provider can load GroupQueryAttention yet reject, at run time, an input the fast graph
    needs (ONNX Runtime's CUDA kernel rejected `attention_bias` until mid-2026): better to find that
    at load, and fall back saying so, than in the middle of a reply. The feed is made from the graph's
    own inputs, so an export_info.json that disagrees with it is left to _check_base to name."""
    real = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
    feed = {"input_ids": np.zeros((1, 2), np.int64), "position_ids": np.array([[2, 3]], np.int64),
            "seqlens_k": np.array([3], np.int32), "total_sequence_length": np.array(4, np.int32)}
    for arg in session.get_inputs():
        if arg.name == "attention_bias":
            feed[arg.name] = np.zeros((1, 1, 2, 4), real.get(arg.type, np.float32))
        elif arg.name.startswith("past_key_values."):  # (1, kv_heads, rows, head_dim): two cached rows
            feed[arg.name] = np.zeros((1, arg.shape[1], 2, arg.shape[3]), real.get(arg.type, np.float32))
    try:
        session.run(["logits"], feed)
    except Exception as err:  # ONNX Runtime raises its own types
        return f"ONNX Runtime {ort.__version__} cannot run {path} on {session.get_providers()[0]} ({str(err).splitlines()[0][:200]})"
    return None


def resolve_weights(export_dir: Path, info: dict, weights: str) -> str:
    """The weight set an export can decode with: `weights`, or int8 in place of a q4 set the export
    could not write (a base without Q4_1 blocks), said in a warning."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}.")
    if weights == "q4" and not info["files"].get("base_fast_q4") and info["files"].get("base_fast_int8"):
        why = info.get("quantised", {}).get("q4", {}).get("skipped", "not written")
        warnings.warn(f"{export_dir} has no q4 graph ({why}); decoding with its int8 weights instead.", stacklevel=3)
        return "int8"
    return weights


def load_runtime(export_dir: str | Path, capacity: int, threads: int = 0, provider: str = "auto",
                 max_nodes: int = 128, with_heads: bool = True, spin: bool = True, graph: str = "auto",
                 weights: str = "fp32") -> OrtRuntime:
    """Sessions, KV cache and buffers for decoding an export. `graph`: "auto" (the fast graph where it
    can run, else the reference graph with a warning saying why), "fast" (or an error) or "reference".
    `weights` (quant.WEIGHTS): the base's weights, "fp32" (either graph), "int8" or "q4" (fast graph)."""
    export_dir = Path(export_dir)
    if capacity < 1 or max_nodes < 1 or threads < 0:
        raise ValueError(f"Decoding needs a KV capacity >= 1 (the kv_capacity setting), max_nodes >= 1 and threads >= 0 "
                         f"(the threads setting or --threads; 0 = one per core), not capacity={capacity}, "
                         f"max_nodes={max_nodes}, threads={threads}.")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, not {graph!r}.")
    info = read_export_info(export_dir)
    weights = resolve_weights(export_dir, info, weights)
    if weights != "fp32" and graph == "reference":
        raise ValueError(f"graph='reference' is the fp32 graph of notebook 04; weights={weights!r} runs on the fast graph: "
                         f"use graph='auto'.")
    providers = execution_providers(provider)
    options = _session_options(threads, spin)
    base = None if graph == "reference" else _fast_session(export_dir, info, graph, capacity, options, providers, weights)
    fast = base is not None
    base = base or _session(export_dir / BASE_FILE, options, providers)
    if base.get_providers()[0] != providers[0]:  # ORT falls back to the CPU when its CUDA provider cannot load
        why = (f"ONNX Runtime could not start its CUDA provider for {export_dir / BASE_FILE} (usually CUDA 13's libcublas, "
               f"libcudart or libcudnn are not found): add the nvidia/*/lib folders of the CUDA wheels to LD_LIBRARY_PATH "
               f"or call onnxruntime.preload_dlls() before loading")
        if provider == "cuda":
            raise RuntimeError(why + ".")
        warnings.warn(why + "; decoding on the CPU now.")
        providers = ["CPUExecutionProvider"]
    _check_base(base, info, export_dir, fast)
    heads, embed = [], None
    heads_options = _session_options(threads, spin)
    if with_heads:
        names = _head_files(export_dir, info)
        heads = [_session(export_dir / name, heads_options, providers) for name in names]
        _check_heads(export_dir, info, names, heads)
        if heads and info.get("token_inputs", "none") != "none":
            embed = _embeddings(export_dir, info)
    device = torch.device("cuda" if providers[0] == "CUDAExecutionProvider" else "cpu")
    dtype = torch.float16 if info["dtype"] == "float16" else torch.float32
    layers, Hkv, D = info["num_layers"], info["kv_heads"], info["head_dim"]
    names_in, names_out = fast_io_names(layers) if fast else io_names(layers)
    # the fast graph's attention writes one spare row after each pass (fast_graph.py): one row more than capacity
    cache_shape = (2 * layers, 1, Hkv, capacity + SPARE_ROWS, D) if fast else (2 * layers, 1, capacity, Hkv, D)
    return OrtRuntime(
        base=base, heads=heads, embed=embed, info=info, device=device, capacity=capacity,
        cache=torch.zeros(cache_shape, dtype=dtype, device=device),
        logits_buf=torch.zeros(1, max_nodes, info["vocab_size"], dtype=dtype, device=device),
        hidden_buf=torch.zeros(1, max_nodes, info["hidden_size"], dtype=dtype, device=device),
        np_dtype=np.float16 if dtype == torch.float16 else np.float32, names_in=names_in, names_out=names_out,
        graph="fast" if fast else "reference", weights=weights,
        bias_buf=torch.zeros(max_nodes * capacity, dtype=dtype, device=device),
        step_buf=torch.zeros(2, max_nodes, dtype=torch.int64) if fast else None,
        seq_buf=torch.zeros(2, dtype=torch.int32) if fast else None, heads_options=heads_options, heads_dir=export_dir,
    )


def _head_files(export_dir: Path, info: dict) -> list[str]:
    """The heads graphs an export lists, checked against its heads: one graph for all of them, or one
    per head for sequential heads."""
    files = info["files"].get("heads", [])
    want = info.get("num_heads", 0) if info.get("token_inputs") == "path" else min(1, info.get("num_heads", 0))
    if len(files) != want:
        raise ValueError(f"{export_dir / 'export_info.json'} lists {len(files)} heads graph(s) for {info.get('num_heads')} "
                         f"heads ({'one per head' if info.get('token_inputs') == 'path' else 'one for all'} expected): "
                         f"the export is incomplete or edited; re-export (notebook 04).")
    return files


def _check_base(session: ort.InferenceSession, info: dict, export_dir: Path, fast: bool) -> None:
    """The base graph agrees with export_info.json's layers, kv heads, head size, vocabulary, hidden size
    and precision (an edited or mixed-up file would otherwise fail inside ONNX Runtime, or not at all)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
    past = inputs.get("past_key_values.0.key")  # (1, Hkv, S, D) in the fast graph, (1, P, Hkv, D) in the reference one
    kv_heads, head_dim = (past.shape[1 if fast else 2], past.shape[3]) if past else (None, None)
    found = {"num_layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
             "vocab_size": outputs["logits"].shape[-1] if "logits" in outputs else None,
             "hidden_size": outputs["hidden_states"].shape[-1] if "hidden_states" in outputs else None,
             "dtype": {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(past.type if past else "")}
    wrong = [f"{key}={info[key]!r} (the graph: {got!r})" for key, got in found.items()
             if (isinstance(got, int) or key == "dtype") and got != info[key]]
    if wrong:
        raise ValueError(f"{export_dir / INFO_FILE} disagrees with the base graph it lists: {', '.join(wrong)}. The file "
                         f"was edited or belongs to another export; re-export (notebook 04).")


def _check_heads(export_dir: Path, info: dict, names: list[str], heads: list) -> None:
    """The heads graphs (files `names`, sessions `heads`) agree with export_info.json: each gives `topk`
    candidates, and sequential head k reads the root and k path tokens (a mismatch would draft the
    wrong candidates, quietly)."""
    for k, (name, session) in enumerate(zip(names, heads)):
        got = session.get_outputs()[0].shape[-1]
        if isinstance(got, int) and got != info["topk"]:
            raise ValueError(f"{export_dir / INFO_FILE} says topk={info['topk']} but {name} gives {got} candidates: "
                             f"the file was edited or belongs to another export; re-export (notebook 04).")
        inputs = {i.name: i.shape for i in session.get_inputs()}
        want = None if info.get("token_inputs", "none") == "none" else (k + 1 if info["token_inputs"] == "path" else 1)
        got = inputs["token_embeddings"][1] if "token_embeddings" in inputs else None
        if (want is None) != (got is None) or (isinstance(got, int) and got != want):
            raise ValueError(f"{name} reads {got or 'no'} token(s), but export_info.json's heads ({info.get('token_inputs')}, "
                             f"head {k}) read {want or 'none'}: the export's heads graphs are mixed up; re-export (notebook 04).")


def _embeddings(export_dir: Path, info: dict) -> np.ndarray:
    """token_embeddings.npy, the base's (V, C) input table for heads that see tokens, read lazily
    (memory-mapped) after checking that it is whole and of the base's shape."""
    path = export_dir / EMBED_FILE
    try:
        table = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: these heads read the base's token embeddings from it; "
                                f"re-export (notebook 04).") from None
    except (ValueError, OSError, EOFError) as err:  # numpy says EOFError for an empty file
        raise ValueError(f"{path} cannot be read ({str(err)[:120]}): it is damaged or truncated; re-export (notebook 04).") from None
    want = (info["vocab_size"], info["hidden_size"])
    if table.shape != want or table.dtype not in (np.float32, np.float16):
        raise ValueError(f"{path} holds a {table.dtype} table of shape {table.shape}, not float ({want[0]}, {want[1]}) "
                         f"as the export's base has: it belongs to another export; re-export (notebook 04).")
    return table


def with_heads_of(rt: OrtRuntime, export_dir: str | Path) -> OrtRuntime:
    """The same base session and KV cache with the heads of another export of the same base (so two
    kinds of heads can be raced without loading the base twice)."""
    info = read_export_info(export_dir)
    for key in ("num_layers", "kv_heads", "head_dim", "hidden_size", "vocab_size", "dtype"):
        if info[key] != rt.info[key]:
            raise ValueError(f"{export_dir} was exported from another base ({key} {info[key]} vs {rt.info[key]}).")
    providers = rt.base.get_providers()
    names = _head_files(Path(export_dir), info)
    heads = [_session(Path(export_dir) / name, rt.heads_options, providers) for name in names]
    _check_heads(Path(export_dir), info, names, heads)  # as load_runtime checks its own
    embed = _embeddings(Path(export_dir), info) if info.get("token_inputs", "none") != "none" else None
    return dataclasses.replace(rt, heads=heads, embed=embed, tree_heads={}, heads_dir=Path(export_dir),
                               info={**rt.info, **{k: info[k] for k in ("files", "topk", "num_heads", "token_inputs", "head_vocab",
                                                       "int8_heads") if k in info},
                                     "heads_fingerprint": info.get("heads_fingerprint")})


def run_base(rt: OrtRuntime, ids: np.ndarray, positions: np.ndarray, bias: np.ndarray | torch.Tensor, n: int,
             into_buffers: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward T tokens at cache offset n; their K/V land in cache rows n..n+T in place. The bias
    may be a torch tensor on the runtime's device (bound in place: nothing crosses to the GPU).

    Returns (logits (T, V), hidden (T, C)): views of the preallocated buffers, or fresh tensors
    when into_buffers is False (the prefill, whose T can exceed the buffers)."""
    if rt.graph == "fast":
        return _run_fast(rt, ids, positions, bias, n, into_buffers)
    T = len(ids)
    dev, dev_id = rt.device.type, rt.device.index or 0
    io = rt.base.io_binding()
    io.bind_cpu_input("input_ids", ids.reshape(1, T).astype(np.int64))
    io.bind_cpu_input("position_ids", positions.reshape(1, T).astype(np.int64))
    if isinstance(bias, torch.Tensor):
        bias = bias.to(device=rt.device, dtype=rt.cache.dtype).contiguous()
        io.bind_input("attention_bias", dev, dev_id, rt.np_dtype, list(bias.shape), bias.data_ptr())
    else:
        io.bind_cpu_input("attention_bias", bias.astype(rt.np_dtype, copy=False))
    if into_buffers:
        logits, hidden = rt.logits_buf, rt.hidden_buf
    else:  # the prefill: outputs of its own size, on the runtime's device
        logits = torch.empty(1, T, rt.logits_buf.shape[2], dtype=rt.cache.dtype, device=rt.device)  # (1, T, V)
        hidden = torch.empty(1, T, rt.hidden_buf.shape[2], dtype=rt.cache.dtype, device=rt.device)  # (1, T, C)
    io.bind_output("logits", dev, dev_id, rt.np_dtype, [1, T, logits.shape[2]], logits.data_ptr())
    io.bind_output("hidden_states", dev, dev_id, rt.np_dtype, [1, T, hidden.shape[2]], hidden.data_ptr())
    kv_shape = rt.cache.shape[3:]
    row_bytes = rt.cache[0, 0, 0].numel() * rt.cache.element_size()
    for j, (name_in, name_out) in enumerate(zip(rt.names_in[3:], rt.names_out[2:])):
        ptr = rt.cache[j].data_ptr()  # (1, capacity, Hkv, D) rows are contiguous
        io.bind_input(name_in, dev, dev_id, rt.np_dtype, [1, n, *kv_shape], ptr)
        io.bind_output(name_out, dev, dev_id, rt.np_dtype, [1, T, *kv_shape], ptr + n * row_bytes)
    if rt.device.type == "cuda":  # ORT runs on its own CUDA stream: torch's writes (bias, compacted cache) must land first
        torch.cuda.synchronize(rt.device)
    t = time.perf_counter()
    rt.base.run_with_iobinding(io)
    if rt.device.type == "cuda":
        io.synchronize_outputs()  # and ORT's outputs before torch reads them
    rt.base_s[0] += time.perf_counter() - t
    return logits[0, :T], hidden[0, :T]  # (T, V), (T, C)


def _bind_fast(rt: OrtRuntime, T: int, ids: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor,
               hidden: torch.Tensor):
    """An IO binding of the fast graph for passes of T tokens: ids and positions (T,) int64 and the
    sequence lengths (rt.seq_buf) read where they lie, logits (1, T', V) and hidden (1, T', C) written
    in place, and every layer's past and present bound to the same cache tensor, so GroupQueryAttention
    reads rows 0..n-1 and writes rows n..n+T-1 in place. Only the bias, whose width n+T changes every
    step, is bound per pass."""
    dev, dev_id = rt.device.type, rt.device.index or 0
    io = rt.base.io_binding()
    io.bind_input("input_ids", "cpu", 0, np.int64, [1, T], ids.data_ptr())
    io.bind_input("position_ids", "cpu", 0, np.int64, [1, T], positions.data_ptr())
    io.bind_input("seqlens_k", "cpu", 0, np.int32, [1], rt.seq_buf.data_ptr())
    io.bind_input("total_sequence_length", "cpu", 0, np.int32, [], rt.seq_buf.data_ptr() + rt.seq_buf.element_size())
    io.bind_output("logits", dev, dev_id, rt.np_dtype, [1, T, logits.shape[2]], logits.data_ptr())
    io.bind_output("hidden_states", dev, dev_id, rt.np_dtype, [1, T, hidden.shape[2]], hidden.data_ptr())
    shape = [1, *rt.cache.shape[2:]]  # (1, kv_heads, capacity, head_dim)
    for j, (name_in, name_out) in enumerate(zip(rt.names_in[5:], rt.names_out[2:])):
        ptr = rt.cache[j].data_ptr()
        io.bind_input(name_in, dev, dev_id, rt.np_dtype, shape, ptr)
        io.bind_output(name_out, dev, dev_id, rt.np_dtype, shape, ptr)
    return io


def _run_fast(rt: OrtRuntime, ids: np.ndarray, positions: np.ndarray, bias, n: int,
              into_buffers: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """run_base on the fast graph. A step writes its few numbers into buffers bound once per pass
    width; the prefill (any length) gets a binding of its own."""
    T = len(ids)
    if n + T > rt.capacity:
        raise ValueError(f"A pass of {T} tokens at offset {n} exceeds the KV capacity of {rt.capacity} tokens.")
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1))  # (T,)
    positions = torch.from_numpy(np.asarray(positions, dtype=np.int64).reshape(-1))  # (T,)
    if into_buffers:
        if T > rt.step_buf.shape[1]:
            raise ValueError(f"A pass of {T} tokens exceeds the runtime's max_nodes={rt.step_buf.shape[1]}.")
        logits, hidden = rt.logits_buf, rt.hidden_buf
        if T not in rt.bindings:
            rt.bindings[T] = _bind_fast(rt, T, rt.step_buf[0], rt.step_buf[1], logits, hidden)
        io = rt.bindings[T]
        rt.step_buf[0, :T], rt.step_buf[1, :T] = ids, positions
    else:
        logits = torch.empty(1, T, rt.logits_buf.shape[2], dtype=rt.cache.dtype, device=rt.device)  # (1, T, V)
        hidden = torch.empty(1, T, rt.hidden_buf.shape[2], dtype=rt.cache.dtype, device=rt.device)  # (1, T, C)
        io = _bind_fast(rt, T, ids, positions, logits, hidden)
    rt.seq_buf[0], rt.seq_buf[1] = n + T - 1, n + T
    if not isinstance(bias, torch.Tensor):
        bias = torch.from_numpy(np.ascontiguousarray(bias))
    bias = bias.to(device=rt.device, dtype=rt.cache.dtype).contiguous()  # a no-op for rt.bias(...) views
    io.bind_input("attention_bias", rt.device.type, rt.device.index or 0, rt.np_dtype, [1, 1, T, n + T], bias.data_ptr())
    t = time.perf_counter()
    rt.base.run_with_iobinding(io)
    rt.base_s[0] += time.perf_counter() - t
    return logits[0, :T], hidden[0, :T]  # (T, V), (T, C)


def run_heads(rt: OrtRuntime, hidden: torch.Tensor, root: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """hidden (C,) [and the root, for root-aware heads] -> each head's top-k ids and probabilities,
    (K, topk) each (heads in one graph: Medusa-1 and root-aware)."""
    feeds = {"hidden_states": hidden.reshape(1, -1).cpu().numpy()}
    if rt.embed is not None:
        feeds["token_embeddings"] = np.asarray(rt.embed[[root]])[None]  # (1, 1, C)
    ids, probs = rt.heads[0].run(None, feeds)
    return ids[0], probs[0]  # (K, topk), (K, topk)


def next_token(logits: torch.Tensor, temperature: float, rng: np.random.Generator | None) -> int:
    """The base's choice from logits (V,): argmax (greedy), or a sample at `temperature`."""
    if temperature <= 0:
        return int(logits.numpy().argmax() if logits.device.type == "cpu" else logits.argmax())
    p = torch.softmax(logits.float() / temperature, dim=-1).cpu().numpy().astype(np.float64)  # (V,)
    return int(rng.choice(len(p), p=p / p.sum()))


# ----------------------------------------------------------------------------------------------
# The five steps

def prefill(rt: OrtRuntime, prompt: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """1. Fill cache rows 0..P-1 with the prompt; return the last position's (logits (V,), hidden (C,))."""
    P = len(prompt)
    logits, hidden = run_base(rt, prompt, np.arange(P), causal_bias(0, P, rt.np_dtype), 0, into_buffers=False)
    return logits[-1].clone(), hidden[-1].clone()  # (V,), (C,)


def propose(rt: OrtRuntime, root: int, hidden: torch.Tensor, tree: TreeBuffers) -> np.ndarray:
    """2. Tree tokens (N,): the root, then each node's candidate from its head's top-k.

    Medusa-1 and root-aware heads: one call gives every head's top-k; a node takes rank p[-1] of
    head len(p)-1 (the candidate vector of docs/design.md). Sequential heads: depth by depth, each
    depth batched over its parents, all in one call (tree_heads.py); a node takes rank p[-1] of its
    head given its own parent path."""
    if not tree.paths:  # no heads' nodes (a tree of the root and a prompt-lookup chain only)
        return np.full(tree.size, root, dtype=np.int64)
    if rt.info.get("token_inputs") == "path":
        return propose_sequential(rt, root, hidden, tree)
    ids, _ = run_heads(rt, hidden, root)  # (K, topk)
    candidates = np.concatenate([[root], ids.reshape(-1)])  # (1 + K*topk,)
    return candidates[tree.tree_indices]  # (N,)


TREE_HEADS_KEPT = 8  # one-call heads graphs a runtime keeps (a plan uses one or two menus; each holds the heads' weights)


def tree_heads(rt: OrtRuntime, tree: TreeBuffers) -> TreeHeads:
    """Sequential heads: the one graph that drafts every node of `tree` (tree_heads.py), made at its
    first use from the export's heads files and kept per tree. Heads exported again into the folder
    since the runtime was loaded are refused (they would draft for other heads than it checked)."""
    if tree.paths not in rt.tree_heads:
        now = read_export_info(rt.heads_dir)
        if now.get("heads_fingerprint") != rt.info.get("heads_fingerprint") or \
                now["files"].get("heads") != rt.info["files"].get("heads"):
            raise RuntimeError(f"{rt.heads_dir} holds other heads than when this runtime was loaded (exported again "
                               f"since): load the runtime again (decoding.load_runtime, or with_heads_of).")
        files = [rt.heads_dir / name for name in _head_files(rt.heads_dir, rt.info)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is missing since this runtime was loaded: re-export (notebook 04) "
                                    f"and load the runtime again.")
        if len(rt.tree_heads) >= TREE_HEADS_KEPT:  # a sweep over many trees keeps only the latest graphs
            rt.tree_heads.pop(next(iter(rt.tree_heads)))
        rt.tree_heads[tree.paths] = TreeHeads(files, tree, rt.embed, rt.heads_options, rt.base.get_providers(),
                                              rt.device.index or 0)
    return rt.tree_heads[tree.paths]


def propose_sequential(rt: OrtRuntime, root: int, hidden: torch.Tensor, tree: TreeBuffers) -> np.ndarray:
    """2, for sequential heads: head d reads the root and the path of each parent at depth d; all
    depths in one call (tree_heads). A prompt-lookup chain's nodes (after the heads' nodes) hold the root
    until the chain is written there."""
    tokens = np.full(tree.size, root, dtype=np.int64)  # (N,)
    drafted = tree_heads(rt, tree)(root, hidden.reshape(1, -1).cpu().numpy())[0]  # (1 + heads' nodes,)
    tokens[: len(drafted)] = drafted
    return tokens


def draft(rt: OrtRuntime, root: int, hidden: torch.Tensor, tree: TreeBuffers,
          rule: DraftRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2, with a DraftRule: the nodes of `tree` drafted this step (tree.grow_draft), the tokens (N,)
    and each node's own probability (N,) (its head's, given its parent path; the root's 1; NaN where
    no head was asked, whose tokens are placeholders).

    The heads make their one call, which gives every node of the tree at once (sequential heads:
    every depth, on every parent); the rule then keeps the nodes the heads are surest of."""
    if not tree.paths or not rule.budget:  # an empty menu or no node allowed: no heads to ask
        own = np.full(tree.size, np.nan)  # (N,) NaN: no head was asked
        own[0] = 1.0
        return np.zeros(1, dtype=np.int64), np.full(tree.size, root, dtype=np.int64), own
    if rt.info.get("token_inputs") == "path":
        tokens, own = tree_heads(rt, tree)(root, hidden.reshape(1, -1).cpu().numpy())  # (N,), (N,)
    else:
        ids, probs = run_heads(rt, hidden, root)  # (K, topk) each
        tokens = np.concatenate([[root], ids.reshape(-1)])[tree.tree_indices]  # (N,)
        own = np.concatenate([[1.0], probs.reshape(-1)])[tree.tree_indices]  # (N,)

    def expand(d, on):
        level = tree.levels[d]
        return own[level.children[on[level.slot]]]
    return grow_draft(tree, rule, expand), tokens, own


def verify(rt: OrtRuntime, tree_tokens: np.ndarray, tree: TreeBuffers, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3. One forward of the N tree tokens at positions n + depth, attending to the whole prefix
    and, inside the block, only along the tree mask."""
    N = len(tree_tokens)
    bias = rt.bias(N, n)  # (1, 1, N, n+N) in the preallocated buffer, where ORT reads it
    bias[0, 0, :, :n] = 0.0  # the whole prefix is seen
    bias[0, 0, :, n:] = torch.from_numpy(np.where(tree.mask, 0.0, MASKED)).to(bias)  # (N, N) block
    return run_base(rt, tree_tokens, n + tree.positions, bias, n)  # (N, V), (N, C)


def accept(tree_tokens: np.ndarray, logits: torch.Tensor, tree: TreeBuffers, temperature: float,
           rng: np.random.Generator | None) -> tuple[int, int, int]:
    """4. Choose the accepted path. Returns (row, L, next root).

    Greedy (temperature 0): candidate j+1 of a row is accepted when it equals the base's argmax at
    node j. Typical (temperature > 0): when its probability under the base at node j exceeds
    min(eps, alpha * exp(-entropy)), the entropy computed as upstream Medusa does,
    -sum p log(p + 1e-5). The next root is the argmax (or a sample) at the last accepted node."""
    retrieve = tree.retrieve_indices  # (R, D+1)
    child = retrieve[:, 1:]  # (R, D)
    valid = child != PAD  # (R, D)
    cand = tree_tokens[np.where(valid, child, 0)]  # (R, D)
    parent = retrieve[:, :-1].clip(min=0)  # (R, D)
    if temperature <= 0:
        argmax = (logits.numpy().argmax(-1) if logits.device.type == "cpu" else logits.argmax(-1).cpu().numpy())  # (N,)
        ok = (cand == argmax[parent]) & valid  # (R, D)
        accept_len = np.cumprod(ok, axis=1).sum(axis=1)  # (R,)
        row = int(np.argmax(accept_len))
        L = int(accept_len[row])
        return row, L, int(argmax[retrieve[row, L]])
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    entropy = -(probs * torch.log(probs + ENTROPY_EPS)).sum(-1).cpu().numpy()  # (N,), upstream's form
    p_cand = probs[torch.from_numpy(parent).to(probs.device), torch.from_numpy(cand).to(probs.device)].cpu().numpy()  # (R, D)
    threshold = np.minimum(TYPICAL_EPS, TYPICAL_ALPHA * np.exp(-entropy[parent]))  # (R, D)
    ok = (p_cand > threshold) & valid
    accept_len = np.cumprod(ok, axis=1).sum(axis=1)  # (R,)
    logp = np.where(np.cumprod(ok, axis=1) > 0, np.log(np.maximum(p_cand, 1e-20)), 0.0).sum(axis=1)  # (R,)
    row = int(np.lexsort((-logp, -accept_len))[0])  # longest, then most probable
    L = int(accept_len[row])
    return row, L, next_token(logits[retrieve[row, L]], temperature, rng)


def compact(rt: OrtRuntime, nodes: np.ndarray, n: int) -> None:
    """5. Move the accepted nodes' K/V rows from n + node to n, n+1, ... (a few rows, not the cache)."""
    rows = rt.token_rows()  # (2L, capacity, Hkv, D), a view of either layout
    if rt.device.type == "cpu":  # numpy on the shared memory: no torch thread pool for a few rows
        rows = rows.numpy()
        rows[:, n: n + len(nodes)] = rows[:, n + nodes]  # (2L, L+1, Hkv, D); the RHS is gathered first
        return
    src = torch.from_numpy(n + nodes).to(rt.device)  # (L+1,)
    rows[:, n: n + len(nodes)] = rows[:, src]  # (2L, L+1, Hkv, D)


# ----------------------------------------------------------------------------------------------
# The loop

class StepClock:
    """`with clock("verify"): ...` adds the block's wall time to split_s["verify"]."""

    def __init__(self, split_s: dict):
        self.split_s = split_s

    @contextlib.contextmanager
    def __call__(self, part: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.split_s[part] += time.perf_counter() - t


def token_ids(prompt_ids) -> np.ndarray:
    """One prompt as int64 token ids (P,): a flat list (or a batch of one) of whole numbers, else an error
    (a float would be truncated, a string parsed and two prompts joined, each quietly)."""
    raw = np.asarray(prompt_ids)
    if raw.ndim == 2 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 1 or (raw.size and raw.dtype.kind not in "iu"):
        raise ValueError(f"prompt_ids must be one prompt of token ids (whole numbers), not {raw.dtype} of shape {raw.shape}.")
    return raw.astype(np.int64)


def _eos_list(eos_token_ids) -> list[int]:
    if isinstance(eos_token_ids, (str, bytes)) or not hasattr(eos_token_ids, "__iter__") \
            or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in eos_token_ids):
        raise ValueError(f"eos_token_ids must be a list of token ids (whole numbers), not {eos_token_ids!r}.")
    return [int(e) for e in eos_token_ids]


def check_request(rt: OrtRuntime, prompt: np.ndarray, max_new_tokens: int, temperature: float) -> None:
    """Clear errors for requests the loop cannot serve (instead of a wrong answer or a traceback)."""
    V = rt.info["vocab_size"]
    if prompt.size == 0:
        raise ValueError("The prompt is empty: give at least one token (the chat template adds some to any text).")
    if prompt.min() < 0 or prompt.max() >= V:
        bad = int(prompt[(prompt < 0) | (prompt >= V)][0])
        raise ValueError(f"Token id {bad} in the prompt is outside the vocabulary (0..{V - 1}): was it made by another tokenizer?")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0 (0 makes none), not {max_new_tokens!r}.")
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), not {temperature!r}.")


def check_tree(rt: OrtRuntime, tree: TreeBuffers) -> None:
    """A tree must fit the exported heads: there must be heads, and its topk and depth must match."""
    info = rt.info
    if not tree.paths:  # the root (and a prompt-lookup chain) only: no heads needed
        return
    if not rt.heads:
        raise ValueError(f"A {tree.size}-node tree was given but this runtime has no heads (heads graph missing from "
                         f"the export, or loaded with with_heads=False): export heads (notebook 04) or decode plainly "
                         f"with tree=None.")
    if tree.topk != info["topk"]:
        raise ValueError(f"The tree was built for topk={tree.topk} but the heads were exported with topk={info['topk']}: "
                         f"rebuild the tree with topk={info['topk']} (notebook 03) or re-export with topk={tree.topk}.")
    if tree.heads_depth > info["num_heads"]:
        raise ValueError(f"The tree is {tree.heads_depth} deep but the export has {info['num_heads']} heads: "
                         f"use a tree of depth <= {info['num_heads']}.")


def generate(rt: OrtRuntime, prompt_ids, tree: TreeBuffers | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, seed: int = 0, eos_token_ids=None, lookup: int = 0, lookup_min_ngram: int = 1,
             lookup_tree: TreeBuffers | None = None, rule: DraftRule | None = None,
             lookup_rule: DraftRule | None = None) -> tuple[list[int], DecodeStats]:
    """Decode from `prompt_ids`. With a tree and heads: Medusa; without: plain greedy (or sampling).
    `lookup` > 0 adds a chain of that many prompt-lookup candidates under the root on the steps where
    the text's last n-gram (n >= lookup_min_ngram) occurred before (tree.with_lookup); it needs a tree
    (a root-only one will do). On those steps the heads draft `lookup_tree` (default: `tree`), so a
    plan can keep a step's pass small (replay.choose_plan sizes both). With a `rule` the tree is a
    menu: each step drafts only the nodes the heads are surest of (tree.DraftRule; `lookup_rule`, by
    default `rule`, on the lookup steps).

    Returns (new token ids, DecodeStats). Greedy Medusa output equals plain greedy output."""
    prompt = token_ids(prompt_ids)
    check_request(rt, prompt, max_new_tokens, temperature)
    eos = set(rt.info.get("eos_token_ids", []) if eos_token_ids is None else _eos_list(eos_token_ids))
    if lookup and tree is None:
        raise ValueError("lookup needs a tree: pass build_tree([], topk, num_heads) for prompt lookup alone.")
    check_lookup(lookup, lookup_min_ngram)
    medusa = tree is not None and (tree.size > 1 or lookup > 0)
    if medusa:
        check_tree(rt, tree)
        if lookup_tree is not None:
            check_tree(rt, lookup_tree)
        if rt.weights != "fp32":  # quantised graphs: chains only (see OrtRuntime.weights)
            tree, lookup_tree = top_chain(tree), (subtree(tree, np.array([0])) if lookup else None)
    if medusa and rt.info.get("token_inputs") == "path":  # the heads' graphs made before the clock starts
        for menu in (tree, lookup_tree or tree):
            if menu.paths:
                tree_heads(rt, menu)
    looked = with_lookup(tree if lookup_tree is None else lookup_tree, lookup) if medusa else None
    N = max(tree.size, looked.size) if medusa else 1
    if N > rt.logits_buf.shape[1]:
        raise ValueError(f"The tree has {N} nodes but the runtime was loaded with max_nodes={rt.logits_buf.shape[1]}.")
    if len(prompt) + N > rt.capacity:
        raise ValueError(f"The prompt has {len(prompt)} tokens; with a {N}-node tree it cannot fit the KV cache of "
                         f"{rt.capacity} tokens. Shorten the prompt or raise the capacity (the kv_capacity setting, "
                         f"e.g. WORKBOOK_OVERRIDES='{{\"kv_capacity\": {2 * (len(prompt) + N)}}}').")
    rng = np.random.default_rng(seed)
    stats = DecodeStats(prompt_tokens=len(prompt))
    out: list[int] = []
    if max_new_tokens == 0:  # none asked for, none made (not even the prefill)
        return out, stats

    t0 = time.perf_counter()
    logits, hidden = prefill(rt, prompt)  # 1
    root = next_token(logits, temperature, rng)
    stats.prefill_s = time.perf_counter() - t0
    n = len(prompt)
    t_start = time.perf_counter()
    base_before = rt.base_s[0]
    clock = StepClock(stats.split_s)
    while True:
        if n + N > rt.capacity:
            stats.stopped = "capacity"
            break
        if medusa:
            with clock("heads"):  # 2 propose (the lookup chain only on steps where the text repeats itself)
                history = np.concatenate([prompt, np.asarray(out, dtype=np.int64), [root]]) if lookup else None
                follow = prompt_lookup(history, lookup, lookup_min_ngram) if lookup else None
                step_rule = rule if follow is None else (lookup_rule or rule)
                if step_rule is None:  # the same tree every step
                    step_tree = tree if follow is None else looked
                    tree_tokens = propose(rt, root, hidden, step_tree)  # (N,)
                else:  # the confident part of the menu
                    menu = tree if follow is None else (lookup_tree or tree)
                    nodes, menu_tokens, _ = draft(rt, root, hidden, menu, step_rule)  # (n,), (N_menu,)
                    step_tree = subtree(menu, nodes, 0 if follow is None else lookup)
                    tree_tokens = np.concatenate([menu_tokens[nodes], np.zeros(step_tree.size - len(nodes), dtype=np.int64)])
                if follow is not None:
                    tree_tokens[step_tree.lookup_nodes] = follow
            with clock("verify"):  # 3
                logits, hiddens = verify(rt, tree_tokens, step_tree, n)  # (N, V), (N, C)
            with clock("accept"):  # 4
                row, L, next_root = accept(tree_tokens, logits, step_tree, temperature, rng)
                nodes = step_tree.retrieve_indices[row, : L + 1]  # (L+1,)
            with clock("compact"):  # 5
                compact(rt, nodes, n)
            emitted = tree_tokens[nodes].tolist()
            hidden = hiddens[nodes[-1]].clone()
        else:  # plain decoding: one token per pass
            with clock("verify"):
                bias = rt.bias(1, n).zero_()  # (1, 1, 1, n+1): sees all
                logits, _ = run_base(rt, np.array([root]), np.array([n]), bias, n)  # (1, V)
            with clock("accept"):
                next_root = next_token(logits[0], temperature, rng)
            L, emitted = 0, [root]
        stats.steps += 1
        stats.accept_lens.append(L)
        stats.pass_sizes.append(len(tree_tokens) if medusa else 1)
        n += L + 1
        root = next_root
        for tok in emitted:
            out.append(tok)
            if tok in eos:
                stats.stopped = "eos"
                break
            if len(out) >= max_new_tokens:
                break
        if stats.stopped == "eos" or len(out) >= max_new_tokens:
            if len(out) >= max_new_tokens and stats.stopped != "eos":
                stats.stopped = "max_new_tokens"
            break
    stats.decode_s = time.perf_counter() - t_start
    stats.base_s = rt.base_s[0] - base_before
    stats.new_tokens = len(out)
    return out, stats


# ----------------------------------------------------------------------------------------------
# Parity of the exported graph with PyTorch (notebook 04, tests)

@torch.no_grad()
def parity_report(model, rt, prompt_ids, tree_tokens: np.ndarray, tree) -> list[dict]:
    """Max |Δlogits| of ORT against PyTorch: on the prefill (against the Hugging Face model), on a
    tree step (against the exported PyTorch module on the same inputs), and for every tree node
    against the Hugging Face model run on the plain sequence prompt + that node's path."""
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    P = len(prompt)
    device = next(model.parameters()).device
    hf = model(torch.from_numpy(prompt)[None].to(device)).logits[0].float().cpu()  # (P, V)
    ort_last, _ = prefill(rt, prompt)
    rows = [{"check": "prefill, last position: ORT vs Hugging Face", "tokens": P,
             "max_abs_diff": float((ort_last.float().cpu() - hf[-1]).abs().max())}]
    ort_tree = verify(rt, tree_tokens, tree, P)[0].float().cpu().clone()  # (N, V)
    layers, Hkv, D = kv_shape(model)
    past = [rt.kv_rows(j, 0, P)[None].to(device=device, dtype=next(model.parameters()).dtype) for j in range(2 * layers)]
    bias = np.zeros((1, 1, len(tree_tokens), P + len(tree_tokens)), dtype=np.float32)
    bias[0, 0, :, P:] = np.where(tree.mask, 0.0, MASKED)
    torch_tree = TreeStep(model)(torch.from_numpy(tree_tokens)[None].to(device),
                                 torch.from_numpy(P + tree.positions)[None].to(device),
                                 torch.from_numpy(bias).to(device=device, dtype=past[0].dtype), *past)[0][0].float().cpu()
    rows.append({"check": "tree step: ORT vs PyTorch (same inputs)", "tokens": len(tree_tokens),
                 "max_abs_diff": float((ort_tree - torch_tree).abs().max())})
    worst = 0.0
    for row in tree.retrieve_indices:
        nodes = row[row >= 0]
        seq = np.concatenate([prompt, tree_tokens[nodes]])
        ref = model(torch.from_numpy(seq)[None].to(device)).logits[0, P:].float().cpu()  # (len(nodes), V)
        worst = max(worst, float((ort_tree[nodes] - ref).abs().max()))
    rows.append({"check": "tree step: ORT per node vs Hugging Face on prompt + path", "tokens": len(tree_tokens),
                 "max_abs_diff": worst})
    return rows
