"""Medusa-1 training: heads on a frozen base, from cached hidden states (paper section 2.2.1).

The base is frozen, so its final hidden states, its own next-token choice and its top few logits
(the teacher's distribution) are computed once, stored in fp16 shards (resumable, atomic) and reused
by every training run. Loss: sum over heads of
decay**k * CE_k; head k at position t learns the token at t+2+k, only where that token is an
assistant token. Labels are the data's tokens, the base's own argmax ("base"), or that argmax only
where the data follows the base's own choices ("greedy"); evaluation always scores against the
base's greedy continuation, which is what decides acceptance. Heads that see tokens (root-aware,
sequential) are teacher-forced: their path tokens are the cache's tokens, on the base's greedy path
wherever the `greedy` rule keeps a label.

Each run trains into its own folder (`run_dir`): the preset's own settings into data/<preset>/heads
(what notebooks 03-06 read), the sequential variant into data/<preset>/hydra, anything else (a
sweep, the widget in notebook 02) into data/<preset>/runs/<what differs>/, so no run overwrites
another's finished heads.

Runs under Hugging Face accelerate, on one CPU or many GPUs:
    python -m medusa_lib.train --preset tiny
    accelerate launch -m medusa_lib.train --preset full
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from medusa_lib.config import PRESETS, RUN_FIELDS, WorkbookConfig, get_config, hydra_config
from medusa_lib.files import atomic_path, fingerprint, folder_lock, read_json, write_json
from medusa_lib.heads import HeadsConfig, MedusaHeads, save_heads

IGNORE = -100  # no label here
MISS = -1  # a label outside the heads' scored vocabulary: counted as wrong, never trained on
SCORED_RANKS = 5  # accuracies are measured for ranks 1..5 (acc@1..5, cacc@1..5); trees use no other ranks
TEACHER_TOPK = 8  # base logits kept per position for the soft (teacher) target
CSV_FIELDS = (["step", "head", "split", "loss"] + [f"acc@{k}" for k in range(1, SCORED_RANKS + 1)]
              + [f"cacc@{k}" for k in range(1, SCORED_RANKS + 1)])


# ----------------------------------------------------------------------------------------------
# 1. Hidden-state cache

def model_fingerprint(model) -> str:
    """A hash of the model's config and every weight: another checkpoint of the same architecture
    gets another cache."""
    import hashlib

    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_hidden_cache(model, examples: list[dict], cache_root: str | Path, batch_tokens: int,
                       shard_sequences: int = 64, desc: str = "caching hidden states") -> Path:
    """Run the frozen base over `examples` once; store per token: final hidden state (fp16), the
    base's argmax next token and its top TEACHER_TOPK logits, the input token, the loss mask and the
    sequence number.

    Shards land atomically in cache_root/<fingerprint>/; an interrupted run resumes at the first
    missing shard. The fingerprint covers the model's weights, the tokens and the loss mask, so other
    data, another mask or another model gets its own folder."""
    key = fingerprint(model_fingerprint(model), [e["input_ids"] for e in examples], [e["loss_mask"] for e in examples],
                      TEACHER_TOPK)
    folder = Path(cache_root) / key
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        return folder
    with folder_lock(folder, desc):
        device = next(model.parameters()).device
        shards = [examples[i: i + shard_sequences] for i in range(0, len(examples), shard_sequences)]
        total = sum(len(e["input_ids"]) for e in examples)
        bar = tqdm(total=total, desc=desc, unit="tok")
        for s, shard in enumerate(shards):
            path = folder / f"shard_{s:05d}.safetensors"
            if path.is_file():
                bar.update(sum(len(e["input_ids"]) for e in shard))
                continue
            parts = {"hidden": [], "base_next": [], "top_ids": [], "top_logits": [], "tokens": [], "loss_mask": [], "seq": []}
            order = sorted(range(len(shard)), key=lambda i: len(shard[i]["input_ids"]))
            i = 0
            while i < len(order):  # batches of similar length, at most batch_tokens padded tokens
                j = i + 1
                while j < len(order) and (j - i + 1) * len(shard[order[j]]["input_ids"]) <= batch_tokens:
                    j += 1
                batch = [shard[k] for k in order[i:j]]
                T = max(len(e["input_ids"]) for e in batch)
                ids = torch.zeros(len(batch), T, dtype=torch.long)
                att = torch.zeros(len(batch), T, dtype=torch.long)
                for b, e in enumerate(batch):
                    ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
                    att[b, : len(e["input_ids"])] = 1
                with torch.no_grad():
                    out = model.model(input_ids=ids.to(device), attention_mask=att.to(device))
                    hidden = out.last_hidden_state  # (B, T, C), final norm applied
                    top = model.lm_head(hidden).float().topk(TEACHER_TOPK, dim=-1)  # (B, T, R)
                for b, (k, e) in enumerate(zip(order[i:j], batch)):
                    n = len(e["input_ids"])
                    parts["hidden"].append(hidden[b, :n].to(torch.float16).cpu())  # (n, C)
                    parts["base_next"].append(top.indices[b, :n, 0].to(torch.int32).cpu())  # (n,) the argmax
                    parts["top_ids"].append(top.indices[b, :n].to(torch.int32).cpu())  # (n, R)
                    parts["top_logits"].append(top.values[b, :n].to(torch.float16).cpu())  # (n, R)
                    parts["tokens"].append(torch.tensor(e["input_ids"], dtype=torch.int32))
                    parts["loss_mask"].append(torch.tensor(e["loss_mask"], dtype=torch.uint8))
                    parts["seq"].append(torch.full((n,), s * shard_sequences + k, dtype=torch.int32))
                bar.update(int(att.sum()))
                i = j
            tensors = {name: torch.cat(v) for name, v in parts.items()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
        bar.close()
        write_json(manifest_path, {"shards": len(shards), "sequences": len(examples), "tokens": total})
        return folder


def load_hidden_cache(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    parts = [load_file(str(folder / f"shard_{s:05d}.safetensors")) for s in range(manifest["shards"])]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def head_targets(cache: dict[str, torch.Tensor], num_heads: int, label_source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (P,), labels (P, K)): for head k at position t the target sits at t+2+k in the
    same sequence, counted only where it is an assistant token; IGNORE elsewhere.

    label_source "data": the token itself. "base": the base's argmax at t+1+k, i.e. what the base
    would generate there given the data's prefix. "greedy": that same label, kept only where the data
    from t+1 to t+1+k is what the base itself would have generated; then the label is exactly the
    base's greedy continuation from t, which is what decides acceptance (self-distillation without
    generating anything)."""
    if label_source not in ("data", "base", "greedy"):
        raise ValueError(f"label_source must be 'data', 'base' or 'greedy', not {label_source!r}")
    N = cache["tokens"].shape[0]
    seq = cache["seq"]
    labels = torch.full((N, num_heads), IGNORE, dtype=torch.long)
    source = cache["tokens"] if label_source == "data" else cache["base_next"]
    shift = 0 if label_source == "data" else 1  # base_next[j-1] predicts token j
    # on_path[i]: token i+1 is the base's own choice after token i (same sequence)
    on_path = torch.zeros(N, dtype=torch.bool)
    on_path[:-1] = (cache["base_next"][:-1] == cache["tokens"][1:]) & (seq[:-1] == seq[1:])
    follows = torch.ones(N, dtype=torch.bool)  # data from t+1 to t+1+k follows the base's choices
    for k in range(num_heads):
        off = 2 + k
        t = torch.arange(N - off)  # positions with a target inside the cache
        j = t + off  # target index
        ok = (seq[j] == seq[t]) & (cache["loss_mask"][j] > 0)  # (N-off,)
        if label_source == "greedy":
            follows[: N - k] &= on_path[k:]  # adds the step from t+k to t+k+1
            ok &= follows[: N - off]
        labels[t[ok], k] = source[j[ok] - shift].long()
    positions = torch.nonzero((labels != IGNORE).any(1)).squeeze(1)  # (P,)
    return positions, labels[positions]  # (P,), (P, K)


def label_window(cache: dict[str, torch.Tensor], num_heads: int, length: int = 10) -> tuple[int, int]:
    """(first row, length) of the first stretch of `length` assistant positions where the `greedy`
    rule both keeps and drops head 0's label: the example notebook 02 shows as a table."""
    has, kept = (torch.zeros(cache["tokens"].shape[0], dtype=torch.bool) for _ in range(2))
    for rule, marks in (("data", has), ("greedy", kept)):  # head 0 has a target at t / keeps it
        rows, labels = head_targets(cache, num_heads, rule)
        marks[rows[labels[:, 0] != IGNORE]] = True
    for t in torch.nonzero(has).squeeze(1).tolist():
        window = slice(t, t + length)
        if has[window].all() and kept[window].any() and not kept[window].all():
            return t, length
    return int(torch.nonzero(has)[0]), length


def label_rows(cache: dict[str, torch.Tensor], num_heads: int, start: int, length: int) -> list[dict]:
    """Rows t = start .. start+length-1: the token at t, the data's and the base's next token, and the
    label each head gets at t under `greedy` (None where the rule drops it, IGNORE positions too)."""
    rows, labels = head_targets(cache, num_heads, "greedy")
    where = {int(r): i for i, r in enumerate(rows)}
    out = []
    for t in range(start, start + length):
        got = labels[where[t]].tolist() if t in where else [IGNORE] * num_heads
        out.append({"t": t, "token": int(cache["tokens"][t]), "next (data)": int(cache["tokens"][t + 1]),
                    "next (base)": int(cache["base_next"][t]),
                    **{f"head {k} (t+{k + 2})": (None if got[k] == IGNORE else got[k]) for k in range(num_heads)}})
    return out


def path_tokens(cache: dict[str, torch.Tensor], positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(P,) positions -> (P, K) the tokens x_{t+1} .. x_{t+K} that heads seeing tokens take (head k
    reads the first k+1). Where head k has a label they are the base's greedy path ("greedy")."""
    N = cache["tokens"].shape[0]
    index = (positions[:, None] + 1 + torch.arange(num_heads)).clamp(max=N - 1)  # (P, K)
    return cache["tokens"][index].long()  # (P, K); past a sequence's end only where no label reads them


def frequent_vocab(cache: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The `size` token ids the base itself writes most often in the cache's assistant text (ties to
    the lower id): the vocabulary that restricted heads score (FR-Spec / VocabTrim)."""
    mine = cache["base_next"][:-1][cache["loss_mask"][1:] > 0].long()  # the base's choice for assistant tokens
    counts = torch.bincount(mine, minlength=size)
    order = torch.argsort(-counts.double() + torch.arange(len(counts)) / (2.0 * len(counts)))  # stable by id
    return order[:size].sort().values  # (size,)


@dataclass
class Targets:
    """Everything one split offers the heads, per labelled position t (P of them)."""
    rows: torch.Tensor  # (P,) cache rows t
    labels: torch.Tensor  # (P, K) in the heads' scored vocabulary; IGNORE, or MISS where not scored
    path: torch.Tensor  # (P, K) token ids x_{t+1} .. x_{t+K}
    soft_ids: torch.Tensor  # (P, K, R) the teacher's top-R tokens for head k (scored-vocabulary index or MISS)
    soft_logits: torch.Tensor  # (P, K, R) their base logits

    def take(self, index: torch.Tensor) -> "Targets":
        return Targets(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def make_targets(cache: dict[str, torch.Tensor], num_heads: int, label_source: str,
                 vocab_ids: torch.Tensor | None = None) -> Targets:
    """Labels, path tokens and teacher targets of a split, in the heads' scored vocabulary."""
    rows, labels = head_targets(cache, num_heads, label_source)
    V = int(max(cache["top_ids"].max(), cache["tokens"].max())) + 1
    to_scored = torch.arange(V)  # token id -> index among the scored tokens, or MISS
    if vocab_ids is not None:
        to_scored = torch.full((max(V, int(vocab_ids.max()) + 1),), MISS, dtype=torch.long)
        to_scored[vocab_ids] = torch.arange(len(vocab_ids))
    scored = torch.where(labels == IGNORE, IGNORE, to_scored[labels.clamp(min=0)])  # (P, K)
    teacher_rows = (rows[:, None] + 1 + torch.arange(num_heads)).clamp(max=cache["tokens"].shape[0] - 1)  # (P, K)
    soft_ids = to_scored[cache["top_ids"][teacher_rows].long()]  # (P, K, R)
    soft_logits = cache["top_logits"][teacher_rows].float()  # (P, K, R)
    return Targets(rows, scored, path_tokens(cache, rows, num_heads), soft_ids, soft_logits)


# ----------------------------------------------------------------------------------------------
# 2. Loss and metrics

def medusa_loss(logits: torch.Tensor, labels: torch.Tensor, decay: float, soft: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K, M), labels (B, K) -> (weighted total, per-head loss (K,)), sum_k decay**k * loss_k.

    Hard target: cross-entropy against the label. Soft target (Hydra's teacher loss), `soft` =
    (ids (B, K, R), logits (B, K, R)): cross-entropy against the base's own distribution over its
    top-R tokens, at the positions that have a label."""
    K = logits.shape[1]
    trainable = labels >= 0  # not IGNORE, not MISS
    logp = logits.float().log_softmax(-1)  # (B, K, M)
    if soft is None:
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, K)
    else:
        ids, teacher = soft
        kept = ids >= 0  # (B, K, R)
        q = torch.where(kept, teacher, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, K, R), over the scored ones
        nll = -(q * logp.gather(-1, ids.clamp(min=0))).sum(-1)  # (B, K)
    count = trainable.sum(0)  # (K,)
    per_head = (nll * trainable).sum(0) / count.clamp(min=1)  # (K,)
    weights = torch.tensor([decay ** k for k in range(K)], device=logits.device)
    return (weights * per_head).sum(), per_head


@torch.no_grad()
def evaluate_heads(heads: MedusaHeads, lm_head: torch.Tensor, hidden: torch.Tensor, targets: "Targets",
                   embed: torch.Tensor | None = None, chunk: int = 512) -> list[dict]:
    """Per head: CE loss and top-1..5 accuracy over the positions where the head has a label
    (`acc@r`), and the same among the positions where every earlier head ranked its label within
    its top 5 (`cacc@r`): head k's accuracy given that the tree can hold the right path before it,
    which is what a tree built from these numbers needs. Labels outside the scored vocabulary
    count as misses."""
    K = targets.labels.shape[1]
    loss_sum, lcount, count = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    hits, chits, ccount = torch.zeros(K, SCORED_RANKS), torch.zeros(K, SCORED_RANKS), torch.zeros(K)
    device = lm_head.device
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i: i + chunk].to(device=device, dtype=lm_head.dtype)  # (b, C)
        y = targets.labels[i: i + chunk].to(device)  # (b, K)
        embeds = embed[targets.path[i: i + chunk].to(device)] if embed is not None else None  # (b, K, C)
        # the class's own forward: fp32 even while accelerate's mixed-precision wrapper sits on the training
        # heads' forward (bf16 on CUDA and on CPUs with native bf16), so a score never depends on the machine
        logits = MedusaHeads.forward(heads, h, lm_head, embeds).float()  # (b, K, M)
        valid = y != IGNORE  # (b, K)
        ce = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")  # (b, K)
        trainable = y >= 0
        loss_sum += (ce * trainable).sum(0).cpu()
        top = logits.topk(SCORED_RANKS, dim=-1).indices  # (b, K, 5)
        match = ((top == y.unsqueeze(-1)).cumsum(-1).clamp(max=1) & valid.unsqueeze(-1)).cpu()  # (b, K, 5)
        hits += match.sum(0)
        count += valid.sum(0).cpu()
        lcount += trainable.sum(0).cpu()
        reachable = torch.ones(match.shape[0], dtype=torch.bool)  # the earlier heads ranked their label in the top 5
        for k in range(K):
            sel = reachable & valid[:, k].cpu()
            chits[k] += match[sel, k].sum(0)
            ccount[k] += sel.sum()
            reachable &= match[:, k, -1].bool()
    count, ccount, lcount = count.clamp(min=1), ccount.clamp(min=1), lcount.clamp(min=1)
    return [{"head": k, "loss": float(loss_sum[k] / lcount[k]),
             **{f"acc@{j + 1}": float(hits[k, j] / count[k]) for j in range(SCORED_RANKS)},
             **{f"cacc@{j + 1}": float(chits[k, j] / ccount[k]) for j in range(SCORED_RANKS)}} for k in range(K)]


# ----------------------------------------------------------------------------------------------
# 3. The training loop (accelerate), with checkpoints and resume

def training_precision(setting: str, use_cuda: bool) -> str:
    """accelerate's mixed_precision for `setting` ("auto", "bf16" or "fp32"). "auto" picks bf16 on
    CUDA and on CPUs with native bf16 matrix units, where it is 2-3x faster than fp32 here; the
    frozen base and the evaluation stay fp32 either way."""
    if setting not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train_precision must be 'auto', 'bf16' or 'fp32', not {setting!r}")
    if setting == "auto":
        cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        setting = "bf16" if use_cuda or cpu_bf16 else "fp32"
    return "bf16" if setting == "bf16" else "no"


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


class RunFolderTaken(ValueError):
    """The output folder holds a run with other settings."""


def data_key(cache: dict) -> str:
    """A hash of everything in a training cache that shapes what the heads learn (the tokens, the loss
    mask and the base's next tokens, all positions): a resumed run must still train on these."""
    import hashlib
    digest = hashlib.sha256()
    for name in ("tokens", "loss_mask", "base_next"):
        digest.update(cache[name].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _restore(state_path: Path, run_key: str, resume: bool, heads, optimizer, scheduler,
             generator, data: str | None = None) -> tuple[int, list, float | None]:
    """Resume from out_dir's last checkpoint when it is this run's; refuse a folder that holds
    another run's heads (they are never overwritten), unless `resume` is False (start afresh).
    Returns (step, log rows, training seconds so far: None from a checkpoint that did not record them)."""
    if not state_path.is_file():
        return 0, [], 0.0
    try:
        state = torch.load(state_path, weights_only=False)
        state["run_key"], state["step"]
    except Exception as err:  # torch raises several types for a cut or damaged file
        if not resume:  # --fresh: this run starts afresh and replaces it
            return 0, [], 0.0
        raise RunFolderTaken(f"{state_path} cannot be read ({type(err).__name__}): the checkpoint is damaged or truncated. "
                             f"The heads in {state_path.parent} are kept; pass resume=False / --fresh to train this run "
                             f"afresh there, or train into another folder.") from None
    if state["run_key"] != run_key:
        if resume:
            raise RunFolderTaken(f"{state_path.parent} holds heads trained with other settings: they are kept. Train "
                                 f"into another folder (out_dir / --out; run_dir(cfg) names one per setting), or "
                                 f"pass resume=False / --fresh to replace them.")
        return 0, [], 0.0
    if not resume:
        return 0, [], 0.0
    if data is not None and state.get("data_key") not in (None, data):  # a checkpoint from before data_key resumes as before
        raise RunFolderTaken(f"{state_path.parent} holds a run with these settings trained on other data (the records, "
                             f"their lengths or the cache behind them changed since): its heads are kept. Train into "
                             f"another folder, or pass resume=False / --fresh to train this run afresh on today's data.")
    heads.load_state_dict(state["heads"]); optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"]); generator.set_state(state["generator"])
    print(f"resuming from step {state['step']} ({state_path})")
    return state["step"], [r for r in state["log"] if int(r["step"]) <= state["step"]], state.get("train_seconds")


@dataclass
class Run:
    """What one training run holds while it trains: the heads and their optimiser state, the data,
    the log so far. `checkpoint` and `evaluate` are the two things the loop does every eval_every steps."""
    cfg: WorkbookConfig
    out_dir: Path
    run_key: str
    accelerator: Accelerator
    heads: MedusaHeads
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lm_head: torch.Tensor  # (V, C) fp32, for evaluation
    embed: torch.Tensor | None  # (V, C) the base's input embeddings, for heads that see tokens
    evals: Targets  # a fixed sample of eval positions
    eval_hidden: torch.Tensor  # (E, C)
    rows: list  # log rows so far
    sampler_state: torch.Tensor  # the batch sampler's state as of the last completed step
    seconds_before: float | None  # training seconds of earlier calls (None: not recorded by an old checkpoint)
    data_key: str | None = None  # data_key(train cache): what a resumed run must still train on
    started: float = dataclasses.field(default_factory=time.time)  # when this call began training
    saved_seconds: float | None = None  # train_seconds() as of the last checkpoint

    def train_seconds(self) -> float | None:
        """Wall seconds this run has trained, over every call that resumed it."""
        return None if self.seconds_before is None else self.seconds_before + time.time() - self.started

    def checkpoint(self, step: int) -> None:
        """heads.safetensors, log.csv and training_state.pt as of `step`, each written atomically."""
        unwrapped = self.accelerator.unwrap_model(self.heads)
        if not self.accelerator.is_main_process:
            return
        log = [r for r in self.rows if int(r["step"]) <= step]
        seconds = self.saved_seconds = self.train_seconds()
        save_heads(unwrapped, self.out_dir, {"step": step, "label_source": self.cfg.label_source,
                                             "head_target": self.cfg.head_target, "train_seconds": seconds})
        _write_log(self.out_dir / "log.csv", log)
        with atomic_path(self.out_dir / "training_state.pt") as tmp:
            torch.save({"run_key": self.run_key, "data_key": self.data_key, "step": step, "heads": unwrapped.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "generator": self.sampler_state, "log": log, "train_seconds": seconds}, tmp)

    def evaluate(self, step: int, train_loss: torch.Tensor) -> None:
        """Score the eval sample; append one eval row and one train row (mean loss since the last) per head."""
        self.heads.eval()
        metrics = evaluate_heads(self.accelerator.unwrap_model(self.heads), self.lm_head, self.eval_hidden, self.evals,
                                 self.embed)
        self.heads.train()
        blank = {f"{a}@{j}": "" for a in ("acc", "cacc") for j in range(1, SCORED_RANKS + 1)}
        for m in metrics:
            self.rows.append({"step": step, "split": "eval", **m})
            self.rows.append({"step": step, "head": m["head"], "split": "train", "loss": float(train_loss[m["head"]]), **blank})


def train_heads(cfg: WorkbookConfig, lm_head: torch.Tensor, train_cache: dict, eval_cache: dict, out_dir: str | Path,
                heads_config: HeadsConfig, resume: bool = True, on_eval=None, embed: torch.Tensor | None = None,
                progress: bool = True) -> dict:
    """Train heads; every cfg.eval_every steps evaluate, append to out_dir/log.csv, checkpoint.

    An interrupted run (Ctrl-C, a killed kernel) restarts from its last checkpoint when called again
    with the same settings; a folder holding another run's heads is refused (see _restore).
    `embed` (V, C) is the base's input embedding table, needed by heads that see tokens.
    `on_eval(rows)` is called after each evaluation (live plots).
    Returns {"heads": MedusaHeads, "log": [rows], "seconds": this call's seconds, "resumed_from": int,
    "train_seconds": the run's training seconds over all its calls as of its last checkpoint (None when an
    old checkpoint did not record them)}."""
    with folder_lock(Path(out_dir), "head training"):
        out_dir = Path(out_dir)
        use_cuda = torch.cuda.is_available() and lm_head.is_cuda
        accelerator = Accelerator(cpu=not use_cuda, mixed_precision=training_precision(cfg.train_precision, use_cuda))
        K = heads_config.num_heads
        run_key = fingerprint(dataclasses.asdict(heads_config), cfg.lr, cfg.train_steps, cfg.batch_positions,
                              cfg.loss_decay, cfg.label_source, cfg.head_target, cfg.seed, cfg.warmup_steps,
                              accelerator.mixed_precision)
        if heads_config.token_inputs != "none" and embed is None:
            raise ValueError(f"token_inputs={heads_config.token_inputs!r} needs the base's input embedding table (embed).")

        # 3a. the heads, the optimiser and what the run had done so far
        vocab_ids = frequent_vocab(train_cache, heads_config.head_vocab) if heads_config.head_vocab else None
        torch.manual_seed(cfg.seed)
        heads = MedusaHeads(heads_config, base_lm_head=lm_head.float().cpu(), vocab_ids=vocab_ids)
        optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.train_steps))
        generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
        data = data_key(train_cache)
        start, rows, seconds_before = _restore(out_dir / "training_state.pt", run_key, resume, heads, optimizer, scheduler,
                                               generator, data)
        heads, optimizer = accelerator.prepare(heads, optimizer)
        lm_head = lm_head.to(accelerator.device)  # fp32 for evaluation
        train_lm_head = lm_head.to(torch.bfloat16) if accelerator.mixed_precision == "bf16" else lm_head  # cast once
        embed = embed.to(accelerator.device) if embed is not None else None

        # 3b. the data: every labelled training position, a fixed sample of eval positions
        train = make_targets(train_cache, K, cfg.label_source, vocab_ids)
        evals = make_targets(eval_cache, K, "greedy", vocab_ids)  # what acceptance checks
        if len(train.rows) == 0 or len(evals.rows) == 0:
            raise ValueError("No assistant positions to train or evaluate on: check the prepared data (notebook 01).")
        evals = evals.take(torch.randperm(len(evals.rows), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_positions])
        run = Run(cfg, out_dir, run_key, accelerator, heads, optimizer, scheduler, lm_head, embed, evals,
                  eval_cache["hidden"][evals.rows], rows, generator.get_state(), seconds_before, data_key=data)

        # 3c. the loop: sample positions, forward, loss, step; evaluate and checkpoint every eval_every
        running, n_running = torch.zeros(K), 0
        if start == 0:
            run.evaluate(0, torch.full((K,), float("nan")))
            if on_eval is not None and accelerator.is_main_process:
                on_eval(rows)
        heads.train()
        bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, desc="training heads",
                   disable=not (progress and accelerator.is_main_process))
        done = start  # optimisation steps completed
        try:
            for step in bar:
                idx = torch.randint(len(train.rows), (cfg.batch_positions,), generator=generator)  # (B,)
                batch = train.take(idx)
                h = train_cache["hidden"][batch.rows].to(device=accelerator.device, dtype=lm_head.dtype)  # (B, C)
                embeds = embed[batch.path.to(accelerator.device)] if embed is not None else None  # (B, K, C)
                soft = ((batch.soft_ids.to(accelerator.device), batch.soft_logits.to(accelerator.device))
                        if cfg.head_target == "soft" else None)
                with accelerator.autocast():
                    logits = heads(h, train_lm_head, embeds)  # (B, K, M)
                    loss, per_head = medusa_loss(logits, batch.labels.to(accelerator.device), cfg.loss_decay, soft)
                accelerator.backward(loss)
                optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
                done, run.sampler_state = step + 1, generator.get_state()
                running += per_head.detach().float().cpu(); n_running += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
                    run.evaluate(step + 1, running / max(1, n_running))
                    running.zero_(); n_running = 0
                    run.checkpoint(step + 1)
                    if on_eval is not None and accelerator.is_main_process:
                        on_eval(rows)
        except KeyboardInterrupt:
            run.checkpoint(done)  # keep what is done; calling again resumes here
            raise
        finally:
            bar.close()
        if start >= cfg.train_steps:
            _write_log(out_dir / "log.csv", rows)
        train_seconds = seconds_before if start >= cfg.train_steps else run.saved_seconds
        # without the mixed-precision wrapper: the heads returned compute what the heads saved compute
        return {"heads": accelerator.unwrap_model(heads, keep_fp32_wrapper=False).eval(), "log": rows, "seconds": time.time() - run.started, "resumed_from": start,
                "train_seconds": train_seconds}


def training_time(result: dict) -> str:
    """How long a run_training result trained, in words (a finished run called again trains for 0 s,
    which is not what a notebook should print)."""
    total, start = result["train_seconds"], result["resumed_from"]
    steps = int(result["log"][-1]["step"]) if result["log"] else 0
    if start >= steps:
        return (f"{steps} steps, trained earlier in {total:,.0f} s (finished: nothing to resume)" if total is not None
                else f"{steps} steps, trained earlier (finished: nothing to resume; its time was not recorded)")
    if start == 0:
        return f"{steps} steps trained in {result['seconds']:,.0f} s"
    return (f"{steps} steps: resumed at step {start}, {result['seconds']:,.0f} s now"
            + (f", {total:,.0f} s in all" if total is not None else ""))


# ----------------------------------------------------------------------------------------------
# 4. The whole job, as notebook 02 and the CLI run it

def training_examples(cfg: WorkbookConfig, tokenizer, split: str) -> list[dict]:
    from medusa_lib.data import read_prepared, tokenize_all

    conversations = read_prepared(cfg.data_dir, split)
    if split == "train" and cfg.train_records:
        conversations = conversations[: cfg.train_records]
    examples, _ = tokenize_all(tokenizer, conversations, cfg.max_length, desc=f"tokenising {split}")
    return examples


def run_dir(cfg: WorkbookConfig) -> Path:
    """The folder a training run with cfg's settings writes: data/<preset>/heads for the preset's own
    settings, data/<preset>/hydra for the preset's sequential heads (config.hydra_config), otherwise
    data/<preset>/runs/<the settings that differ>, e.g. runs/num_heads-3_train_steps-200."""
    preset = PRESETS.get(cfg.name, cfg)
    for name, reference in (("heads", preset), ("hydra", hydra_config(preset))):
        if all(getattr(cfg, f) == getattr(reference, f) for f in RUN_FIELDS):
            return cfg.data_dir / name
    differs = [f"{f}-{getattr(cfg, f)}" for f in RUN_FIELDS if getattr(cfg, f) != getattr(preset, f)]
    slug = "_".join(differs).replace("/", "-")
    if any(c in str(getattr(cfg, f)) for f in RUN_FIELDS if getattr(cfg, f) != getattr(preset, f) for c in "/_"):
        slug += "_" + fingerprint(differs)[:8]  # "org/model" and "org-model", or a value holding "_", named apart
    return cfg.data_dir / "runs" / (slug if len(slug) <= 120 else fingerprint(differs))


def heads_dir(cfg: WorkbookConfig) -> Path:
    """The Medusa-1 heads notebooks 02-06 use: the run of cfg's own settings, run_dir(cfg), which is
    data/<preset>/heads for the preset as it is and runs/<what differs>/ once a setting is changed
    (so the later notebooks always read the heads trained with the settings chosen, never stale ones)."""
    return run_dir(cfg)


def load_caches(cfg: WorkbookConfig, model, tokenizer) -> dict[str, dict]:
    """The hidden-state caches of both splits (built once, then read)."""
    if not getattr(tokenizer, "chat_template", None):  # refused before minutes of caching, not inside them
        raise ValueError(f"The tokenizer of {cfg.base_model!r} has no chat template: the heads are trained on chat replies "
                         f"laid out by it. Use an instruction-tuned base (or set tokenizer.chat_template) first.")
    caches = {}
    for split in ("train", "eval"):
        examples = training_examples(cfg, tokenizer, split)
        folder = build_hidden_cache(model, examples, cfg.data_dir / "hidden_cache", cfg.cache_batch_tokens,
                                    desc=f"caching {split} hidden states")
        caches[split] = load_hidden_cache(folder)
    return caches


def run_training(cfg: WorkbookConfig, model=None, tokenizer=None, on_eval=None, resume: bool = True,
                 out_dir: str | Path | None = None, caches: dict | None = None, progress: bool = True) -> dict:
    """Cache hidden states (once) and train heads for `cfg` into `out_dir` (default: run_dir(cfg))."""
    from medusa_lib.base import load_base

    if model is None:
        model, tokenizer = load_base(cfg.base_model, cfg.device, cfg.dtype)
    caches = caches or load_caches(cfg, model, tokenizer)
    heads_config = HeadsConfig.for_base(model, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                                        head_output=cfg.head_output, token_inputs=cfg.token_inputs,
                                        block_expansion=cfg.block_expansion, head_vocab=cfg.head_vocab,
                                        base_model=cfg.base_model,
                                        data_fingerprint=fingerprint(caches["train"]["tokens"].tolist()[:4096]))
    lm_head = model.get_output_embeddings().weight.detach()
    embed = model.get_input_embeddings().weight.detach() if cfg.token_inputs != "none" else None
    out = Path(out_dir) if out_dir is not None else run_dir(cfg)
    result = train_heads(cfg, lm_head, caches["train"], caches["eval"], out, heads_config,
                         resume=resume, on_eval=on_eval, embed=embed, progress=progress)
    return {**result, "out_dir": out}


def read_log(folder: str | Path):
    """A run's log.csv as a DataFrame (columns: step, head, split, loss, acc@1..5, cacc@1..5)."""
    import pandas as pd

    path = Path(folder) / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train that run first (notebook 02).")
    return pd.read_csv(path)


WIDGET_MARK = "made_by_widget"  # a file in a run folder trained from notebook 02's widget


def finished_runs(cfg: WorkbookConfig, every: bool = False) -> dict[str, Path]:
    """The runs of this preset with a log, by the names the notebooks use: "Medusa-1" (heads_dir: heads/
    for the preset as it is), "sequential" (hydra/) and the runs trained from the widget (runs/<what
    differs>); with `every`, also the runs that command lines and sweeps left under runs/."""
    main = {"Medusa-1": heads_dir(cfg), "sequential": run_dir(hydra_config(cfg))}  # heads/ and hydra/ as the preset is
    others = {f.name: f for f in sorted((cfg.data_dir / "runs").glob("*"))
              if (every or (f / WIDGET_MARK).is_file()) and f not in main.values()}
    return {name: f for name, f in {**main, **others}.items() if (f / "log.csv").is_file()}


def train_job(cfg: WorkbookConfig) -> None:
    """Entry point for accelerate.notebook_launcher: every process loads the base and trains."""
    from accelerate import PartialState

    result = run_training(cfg)
    if PartialState().is_main_process:
        print(f"Medusa-1 heads: {training_time(result)} -> {result['out_dir']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train Medusa heads on cached hidden states of the frozen base.")
    parser.add_argument("--preset", default=None, help="tiny or full (default: $WORKBOOK_PRESET or full)")
    parser.add_argument("--num-heads", type=int); parser.add_argument("--num-layers", type=int)
    parser.add_argument("--head-output", choices=["shared", "own"]); parser.add_argument("--lr", type=float)
    parser.add_argument("--token-inputs", choices=["none", "root", "path"])
    parser.add_argument("--block-expansion", type=int); parser.add_argument("--head-vocab", type=int)
    parser.add_argument("--head-target", choices=["hard", "soft"])
    parser.add_argument("--label-source", choices=["greedy", "base", "data"])
    parser.add_argument("--train-precision", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--train-steps", type=int); parser.add_argument("--base-model")
    parser.add_argument("--hydra", action="store_true", help="the sequential heads of the preset (config.hydra_config)")
    parser.add_argument("--out", help="output folder (default: one per setting, see run_dir)")
    parser.add_argument("--fresh", action="store_true", help="start afresh, replacing the heads in the output folder")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "fresh", "out", "hydra")}
    cfg = get_config(args.preset)
    cfg = (hydra_config(cfg) if args.hydra else cfg).replace(**overrides)
    result = run_training(cfg, resume=not args.fresh, out_dir=args.out)
    for row in result["log"][-2 * cfg.num_heads:]:
        if row["split"] == "eval":
            print(f"head {row['head']}: loss {row['loss']:.3f} top-1 {row['acc@1']:.3f} top-5 {row['acc@5']:.3f} "
                  f"top-1 given a right path {row['cacc@1']:.3f}")
    print(f"{training_time(result)}; heads in {result['out_dir']}")


if __name__ == "__main__":
    from medusa_lib.cli import run_cli
    run_cli(main)
