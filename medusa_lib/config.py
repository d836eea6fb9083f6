"""One configuration dataclass for the whole workbook, with named presets.

Every notebook reads `get_config()`; the preset name comes from the notebook's `parameters` cell
or, if that is left as None, from the environment variable WORKBOOK_PRESET (default "full").
CI sets WORKBOOK_PRESET=tiny. Presets: "tiny" (CI), "full" (2 CPU cores, the real run), "gpu"
(one H100/H200-class GPU).

    cfg = get_config("tiny", num_heads=3)   # any field can be overridden by keyword
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

PRESET_ENV = "WORKBOOK_PRESET"
OVERRIDES_ENV = "WORKBOOK_OVERRIDES"  # JSON object of field overrides (smoke tests: a preset at tiny sizes)
DATA_ENV = "WORKBOOK_DATA"  # root of generated artefacts (default: <repo>/data), one folder per preset


@dataclass(frozen=True)
class WorkbookConfig:
    name: str
    # --- base model -------------------------------------------------------------------------
    base_model: str = "embedded"  # "embedded" = SmolLM2-135M-Instruct GGUF, or any HF id / path
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: str = "auto"  # "auto": float32 on cpu, bfloat16 on cuda
    # --- data (notebook 01) -----------------------------------------------------------------
    data_file: str | None = None  # None = the packaged ShareGPT V3 file
    max_records: int = 0  # complete records kept after recovery (0 = all ~17.6k)
    eval_fraction: float = 0.05
    min_eval_records: int = 1  # eval is never empty
    max_length: int = 512  # tokens per conversation before the cut at a turn boundary
    seed: int = 0
    distill_train_records: int = 0  # first user turns re-answered by the base (0 = off)
    distill_eval_records: int = 0
    distill_max_new_tokens: int = 128
    distill_batch_size: int = 16
    # --- heads and training (notebooks 02, 03) -----------------------------------------------
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    head_output: str = "shared"  # "shared": frozen base lm_head; "own": a vocab layer per head
    token_inputs: str = "none"  # "none": Medusa-1 (the paper); "root": heads also see the root token;
    # "path": head k sees the root and the k tokens drafted before it (sequential, Hydra-style); see heads.py
    block_expansion: int = 0  # 0: the paper's block x + SiLU(Wx+b); r: an MLP block of width r * hidden
    head_vocab: int = 0  # 0: heads score the whole vocabulary; M: only the M tokens the base writes most
    head_target: str = "hard"  # "hard": the label; "soft": the base's top-8 distribution (Hydra's teacher loss)
    hydra_train_steps: int = 0  # steps for the sequential heads (hydra_config); 0 = train_steps
    widget_steps: int = 300  # steps a click on Train in notebook 02 runs by default
    label_source: str = "greedy"  # "greedy": the base's own continuation, where the data follows it; "base": the
    # base's argmax everywhere; "data": the data's tokens (see train.head_targets)
    loss_decay: float = 0.8  # head k weighted decay**k (Medusa-2 recipe; 1.0 = legacy trainer)
    lr: float = 1e-3
    train_precision: str = "auto"  # "auto": bf16 on CUDA or a CPU with native bf16 (AVX512-BF16/AMX), else fp32
    warmup_steps: int = 50
    train_steps: int = 1000
    batch_positions: int = 256  # positions (hidden states) per optimisation step
    eval_every: int = 100
    eval_positions: int = 4096  # eval positions scored at each evaluation
    cache_batch_tokens: int = 4096  # tokens per forward when caching hidden states
    train_records: int = 0  # records cached for training (0 = all of the train split)
    # --- tree and decoding (notebooks 03-06) -------------------------------------------------
    topk: int = 5  # candidates each head offers (TOPK in the design notes): the 5 ranks whose accuracy training
    # measures (train.SCORED_RANKS), since trees are built from those accuracies and never use a rank beyond them
    int8_heads: bool = True  # int8 heads graph: 4x fewer bytes to read; the fp32 base still decides every token
    export_dtype: str = "float32"  # ONNX graphs' float type. "float16" is faster on a GPU (plain decoding 109 vs 81 tok/s
    # on an H200) but not lossless there: the CUDA kernels of a wide verification pass round differently from a
    # one-token pass, and at near-ties Medusa's output left plain fp16 decoding's (18-21 of 26 prompts identical,
    # against 26 of 26 in fp32; static/gpu/). On the CPU provider fp16 is slow and only tested for correctness.
    tree_nodes: int = 24  # node budget for the sparse tree, root excluded
    lookup_tokens: int = 4  # prompt-lookup candidates added under the root when the text repeats (hydra_pld without
    # a replayed plan; notebook 06 chooses the chain, its trigger and the tree beside it on the sizing prompts)
    max_new_tokens: int = 128
    kv_capacity: int = 2048  # tokens the preallocated KV cache holds (prompt + reply + tree)
    base_graph: str = "auto"  # "auto": the fast graph (fast_graph.py) where it runs, else the reference graph, saying
    # why; "fast" (or an error); "reference": export.TreeStep, the graph notebook 04 teaches (docs/engine.md)
    weights: str = "fp32"  # the base's weights in decoding (quant.py): "fp32" (exact, the reference), "int8" (8-bit
    # blocks, any base) or "q4" (the GGUF's 4-bit blocks); the quantised ones run on the fast graph, decode chains only
    threads: int = 0  # ORT intra-op threads (0 = ORT's default: one per core)
    # --- benchmark (notebook 06) -------------------------------------------------------------
    bench_questions: str | None = None  # question.jsonl (Spec-Bench / MT-bench format); None = the held-out ShareGPT prompts
    sizing_questions: str | None = None  # prompts notebook 06 replays to size the trees (never the benchmark's own);
    # None = the held-out ShareGPT prompts
    sizing_prompts: int = 26
    bench_prompts: int = 24
    bench_max_new_tokens: int = 128
    bench_methods: tuple[str, ...] = ("hf", "hf_pld", "ort", "ort_ref", "medusa_chain", "medusa_tree", "hydra_tree", "hydra_pld",
                                      "ort@int8", "ort@q4", "hydra_pld@int8", "hydra_pld@q4", "llamacpp")
    # ort: plain greedy on the base graph decoding uses (base_graph); ort_ref: on the reference graph, beside it;
    # method@int8, method@q4: on the quantised fast graph (quant.py); llamacpp: llama.cpp on the same GGUF, if installed
    cost_curve_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)  # every small T: on 2 AMD cores a
    # pass cost 40-43 ms for T = 1..5 and 52 at T = 6 (measured); linear interpolation from 4 to 8 would hide that step
    figures_dir: str | None = None  # where the notebooks save figures; None = static/<preset> (the README shows static/full)

    def __post_init__(self):
        problems = [p for name in FIELD_NAMES for p in _check_field(name, getattr(self, name))]
        if problems:
            raise ValueError(f"Workbook config {self.name!r}: " + "; ".join(problems) + ".")

    def replace(self, **changes) -> "WorkbookConfig":
        return dataclasses.replace(self, **changes)

    @property
    def data_dir(self) -> Path:
        """Generated artefacts of this preset: <repo>/data/<preset> (tiny never clobbers full)."""
        root = Path(os.environ.get(DATA_ENV, repo_root() / "data")).resolve()
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"${DATA_ENV}={root} is a file: point it at a folder (the data root; each preset "
                                     f"gets a folder inside it), or unset it for <repo>/data.")
        return root / self.name


# ----------------------------------------------------------------------------------------------
# One validation for every field: its type, then its range or its choices, named in the message.

BENCH_METHODS = ("hf", "hf_pld", "ort", "ort_ref", "medusa_chain", "medusa_tree", "hydra_tree", "hydra_pld", "llamacpp")
QUANTISED_METHODS = ("ort", "medusa_chain", "medusa_tree", "hydra_tree", "hydra_pld")  # may take "@int8" or "@q4"
WEIGHTS = ("fp32", "int8", "q4")


def split_method(name: str) -> tuple[str, str]:
    """A benchmark method's name -> (method, weights): "hydra_pld@q4" -> ("hydra_pld", "q4"), "ort" -> ("ort", "fp32")."""
    method, _, weights = name.partition("@")
    return method, weights or "fp32"


def method_known(name: str) -> bool:
    method, weights = split_method(name)
    if "@" not in name:
        return method in BENCH_METHODS
    return method in QUANTISED_METHODS and weights in WEIGHTS[1:]
CHOICES = {
    "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16", "float16"),
    "head_output": ("shared", "own"), "token_inputs": ("none", "root", "path"), "head_target": ("hard", "soft"),
    "label_source": ("greedy", "base", "data"), "train_precision": ("auto", "bf16", "fp32"),
    "export_dtype": ("float32", "float16"), "base_graph": ("auto", "fast", "reference"), "weights": WEIGHTS,
}
AT_LEAST = {  # whole numbers and their least value (0 where 0 means "off" or "all")
    "max_records": 0, "min_eval_records": 0, "max_length": 2, "seed": 0, "distill_train_records": 0,
    "distill_eval_records": 0, "distill_max_new_tokens": 1, "distill_batch_size": 1, "num_heads": 1, "num_layers": 1,
    "block_expansion": 0, "head_vocab": 0, "hydra_train_steps": 0, "widget_steps": 1, "warmup_steps": 0,
    "train_steps": 1, "batch_positions": 1, "eval_every": 1, "eval_positions": 1, "cache_batch_tokens": 1,
    "train_records": 0, "topk": 1, "tree_nodes": 1, "lookup_tokens": 0, "max_new_tokens": 0, "kv_capacity": 1,
    "threads": 0, "sizing_prompts": 1, "bench_prompts": 1, "bench_max_new_tokens": 1,
}
BETWEEN = {"eval_fraction": (0.0, 1.0, "0 <= x < 1"), "loss_decay": (0.0, 1.0, "0 < x <= 1"), "lr": (0.0, 1.0, "0 < x <= 1")}
OPTIONAL_STR = ("data_file", "bench_questions", "sizing_questions", "figures_dir")


def _check_field(name: str, value) -> list[str]:
    """Why `value` is not a valid `name` ([] when it is): one sentence naming the field."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if name == "name":
        return [] if isinstance(value, str) and value else ["name must be a non-empty string"]
    if name in CHOICES:
        ok = value in CHOICES[name] or (name == "device" and isinstance(value, str)
                                        and re.fullmatch(r"cuda:\d+", value) is not None)  # a GPU by its index
        named = ", ".join(repr(c) for c in CHOICES[name][:-1]) + f" or {CHOICES[name][-1]!r}" + \
            (" (or 'cuda:N', a GPU by its index)" if name == "device" else "")
        return [] if ok and isinstance(value, str) else [f"{name} must be {named}, not {value!r}"]
    if name in OPTIONAL_STR:
        return [] if value is None or (isinstance(value, str) and value) else [f"{name} must be a path or null, not {value!r}"]
    if name == "base_model":
        return [] if isinstance(value, str) and value else [f"base_model must be 'embedded', a model id or a path, not {value!r}"]
    if name == "int8_heads":
        return [] if isinstance(value, bool) else [f"int8_heads must be true or false, not {value!r}"]
    if name in AT_LEAST:
        if not whole(value):
            return [f"{name} must be a whole number, not {value!r} ({type(value).__name__})"]
        low = AT_LEAST[name]
        return [] if value >= low else [f"{name} must be at least {low}, not {value!r}"]
    if name in BETWEEN:
        low, high, text = BETWEEN[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            return [f"{name} must be a finite number ({text}), not {value!r}"]
        inside = (low <= value < high) if name == "eval_fraction" else (low < value <= high)
        return [] if inside else [f"{name} must be {text}, not {value!r}"]
    if name == "cost_curve_sizes":
        ok = isinstance(value, tuple) and value and all(whole(v) and v >= 1 for v in value)
        return [] if ok else [f"cost_curve_sizes must be a non-empty list of whole numbers >= 1, not {value!r}"]
    if name == "bench_methods":
        ok = isinstance(value, tuple) and value and all(isinstance(v, str) and method_known(v) for v in value) \
            and len(set(value)) == len(value)
        return [] if ok else [f"bench_methods must be a non-empty list from {BENCH_METHODS} (those of {QUANTISED_METHODS} "
                              f"also as method@int8 or method@q4), each named once, not {value!r}"]
    return [f"{name} has no check: add it to config.py's validation"]


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(WorkbookConfig))


PRESETS: dict[str, WorkbookConfig] = {
    # CI: every notebook in a minute or two on 2 CPU cores.
    "tiny": WorkbookConfig(
        name="tiny",
        max_records=300,
        max_length=256,
        train_records=120,
        distill_train_records=8,
        distill_eval_records=4,
        distill_max_new_tokens=32,
        distill_batch_size=4,
        num_heads=3,
        train_steps=60,
        widget_steps=20,
        warmup_steps=10,
        batch_positions=128,
        eval_every=20,
        eval_positions=512,
        tree_nodes=8,
        max_new_tokens=32,
        kv_capacity=768,
        bench_prompts=3,
        bench_max_new_tokens=24,
        sizing_prompts=2,
        cost_curve_sizes=(1, 4, 8, 16),
    ),
    # The real run: about 80 minutes for all six notebooks from scratch on 2 CPU cores with native bf16, about 2.5 hours
    # without it (README), minutes on a GPU.
    "full": WorkbookConfig(
        name="full",
        max_records=0,
        max_length=768,
        train_records=1965,  # the 1,965 self-distilled replies (they come first): on prompts from outside ShareGPT
        # the sequential heads' head 0 is right 36.8% of the time against 34.0% with 835 replies and 65 of ShareGPT's own
        distill_train_records=2300,  # prompts tried; ~85% fit in 384 tokens. ~45 replies a minute on 2 cores
        distill_eval_records=48,
        distill_max_new_tokens=160,
        distill_batch_size=32,  # prompts sorted by length: 26.9 replies/min vs 19.3 at 16 and 16.4 at 8 (measured, 2 cores)
        num_heads=4,
        num_layers=2,  # 2 blocks: head 0 top-1 0.303 vs 0.286 for 1 block (750-step sweep)
        train_steps=1500,  # ~14 min on 2 cores in bf16: each head-row costs a 49k-vocabulary softmax
        hydra_train_steps=3000,  # head 0 top-1 0.498 at 3,000 steps, 0.485 at 6,000 (docs/findings.md)
        batch_positions=128,
        eval_every=150,
        eval_positions=4096,
        tree_nodes=24,
        max_new_tokens=128,
        kv_capacity=2048,
        bench_questions="static/questions.jsonl",  # 13 categories x 2 prompts written for this workbook, not ShareGPT
        sizing_questions="static/questions_dev.jsonl",  # 26 more of the kind, written apart: the trees are sized on these
        bench_prompts=26,
        bench_max_new_tokens=128,
    ),
    # One modern GPU (H100/H200 class): what a GPU can afford that 2 cores cannot. Distillation makes
    # ~10x the replies (bf16 generation in batches of 128) and training takes 4x the steps on 8x larger
    # batches (both sizes estimated from the CPU runs, not yet timed on a GPU); the cost curve reaches
    # T=256 and the tree has 64 nodes, because on an H200 a pass of 256 tokens cost what one did
    # (measured: 13.5-16.4 ms in fp32 for T = 1..256, static/gpu/results.json); decoding runs 256 tokens.
    # The graphs stay fp32, the lossless choice (see export_dtype), and the heads stay fp32 as well:
    # int8 heads are a CPU-kernel choice.
    "gpu": WorkbookConfig(
        name="gpu",
        max_records=0,
        max_length=1024,
        train_records=12000,  # the ~10k self-distilled replies first, then ShareGPT's own
        distill_train_records=12000,
        distill_eval_records=200,
        distill_max_new_tokens=256,
        distill_batch_size=128,
        num_heads=4,
        num_layers=2,
        train_steps=6000,
        hydra_train_steps=6000,
        batch_positions=1024,
        eval_every=500,
        eval_positions=16384,
        cache_batch_tokens=32768,
        tree_nodes=64,
        int8_heads=False,
        max_new_tokens=256,
        kv_capacity=4096,
        bench_questions="static/questions.jsonl",
        sizing_questions="static/questions_dev.jsonl",
        bench_prompts=26,
        bench_max_new_tokens=256,
        cost_curve_sizes=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256),
    ),
}


# The workbook's extension beside Medusa-1 (notebook 02 trains both; notebook 06 races them): heads
# that see the root and the drafted path, wider blocks, a vocabulary cut to what the base writes, and
# the base's own top-8 distribution as the target (Hydra's teacher loss). Measured on the full cache at
# 1,500 steps: head 0 top-1 0.456 / top-5 0.692 with the soft target against 0.449 / 0.657 with hard labels.
HYDRA = dict(token_inputs="path", block_expansion=4, head_vocab=8192, head_target="soft")


def hydra_config(cfg: "WorkbookConfig") -> "WorkbookConfig":
    """cfg with the sequential heads' settings (HYDRA, and hydra_train_steps when set)."""
    return cfg.replace(**HYDRA, train_steps=cfg.hydra_train_steps or cfg.train_steps)

# The settings a training run depends on: two runs that differ in any of them get their own folder
# (train.run_dir), so no run overwrites another's heads.
RUN_FIELDS = ("base_model", "max_length", "train_records", "seed", "num_heads", "num_layers", "head_output",
              "token_inputs", "block_expansion", "head_vocab", "head_target", "label_source", "loss_decay", "lr",
              "train_precision", "warmup_steps", "train_steps", "batch_positions")


SETTINGS = frozenset(f.name for f in dataclasses.fields(WorkbookConfig)) - {"name"}  # what an override may set


def get_config(preset: str | None = None, **overrides) -> WorkbookConfig:
    """The named preset (or $WORKBOOK_PRESET, default "full") with overrides applied: those in
    $WORKBOOK_OVERRIDES (a JSON object, e.g. '{"train_steps": 20}': how a smoke test shrinks a preset
    for every notebook), then the keyword ones."""
    name = preset or os.environ.get(PRESET_ENV, "full")
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(PRESETS)}.")
    unknown = sorted(set(overrides) - SETTINGS)
    if unknown:
        raise ValueError(f"get_config: unknown settings {unknown}: see WorkbookConfig in medusa_lib/config.py.")
    return PRESETS[name].replace(**{**env_overrides(), **overrides})


def env_overrides() -> dict:
    """Field overrides from $WORKBOOK_OVERRIDES (JSON object), checked against the config's fields."""
    text = os.environ.get(OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        found = json.loads(text)
        assert isinstance(found, dict)
    except (json.JSONDecodeError, AssertionError):
        raise ValueError(f"${OVERRIDES_ENV} must be a JSON object such as '{{\"train_steps\": 20}}', not {text[:80]!r}.") from None
    unknown = sorted(set(found) - SETTINGS)
    if unknown:
        raise ValueError(f"${OVERRIDES_ENV} names unknown settings {unknown}: see WorkbookConfig in medusa_lib/config.py.")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in found.items()}


def repo_root() -> Path:
    """The workbook checkout (the folder holding pyproject.toml), found from this file."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def setup(preset: str | None, *fields: str) -> WorkbookConfig:
    """A notebook's one setup cell: the preset's config, returned, after one line naming the software and
    the machine and one line with the settings this notebook uses (`fields`), so that a reader of the
    committed outputs knows what produced them."""
    import platform

    import onnxruntime
    import torch
    import transformers

    from medusa_lib.bench import cpu_description

    cfg = get_config(preset)
    unknown = [f for f in fields if f not in FIELD_NAMES]
    if unknown:
        raise ValueError(f"setup(): {unknown} are not WorkbookConfig settings (medusa_lib/config.py).")
    cpu = cpu_description()
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"onnxruntime {onnxruntime.__version__} | {cpu['cpu_model']}, {os.cpu_count()} cores "
          f"({' '.join(cpu['cpu_flags']) or 'no AVX2'}) | {accelerator}")
    print(f"preset {cfg.name!r}: " + ", ".join(f"{f}={getattr(cfg, f)!r}" for f in fields))
    return cfg
