"""Medusa-1 training: heads on a frozen base, from cached hidden states (paper section 2.2.1).

The base is frozen, so its final hidden states and its own next-token choices are computed once,
stored in fp16 shards (resumable, atomic) and reused by every training run. Loss: sum over heads of
decay**k * CE_k; head k at position t learns the token at t+2+k, only where that token is an
assistant token. Labels are the data's tokens, the base's own argmax ("base"), or that argmax only
where the data follows the base's own choices ("greedy"); evaluation always scores against the
base's greedy continuation, which is what decides acceptance.

Runs under Hugging Face accelerate, on one CPU or many GPUs:
    python -m medusa_lib.train --preset tiny
    accelerate launch -m medusa_lib.train --preset full
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from medusa_lib.config import WorkbookConfig, get_config
from medusa_lib.files import atomic_path, fingerprint, read_json, write_json
from medusa_lib.heads import HeadsConfig, MedusaHeads, save_heads

IGNORE = -100
TOPK_ACC = 5
CSV_FIELDS = ["step", "head", "split", "loss"] + [f"acc@{k}" for k in range(1, TOPK_ACC + 1)]


# ----------------------------------------------------------------------------------------------
# 1. Hidden-state cache

def build_hidden_cache(model, examples: list[dict], cache_root: str | Path, batch_tokens: int,
                       shard_sequences: int = 64, desc: str = "caching hidden states") -> Path:
    """Run the frozen base over `examples` once; store per token: final hidden state (fp16), the
    base's argmax next token, the input token, the loss mask and the sequence number.

    Shards land atomically in cache_root/<fingerprint>/; an interrupted run resumes at the first
    missing shard, and other data or another model gets its own folder."""
    key = fingerprint(model.config.to_dict(), [e["input_ids"] for e in examples])
    folder = Path(cache_root) / key
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        return folder
    device = next(model.parameters()).device
    shards = [examples[i: i + shard_sequences] for i in range(0, len(examples), shard_sequences)]
    total = sum(len(e["input_ids"]) for e in examples)
    bar = tqdm(total=total, desc=desc, unit="tok")
    for s, shard in enumerate(shards):
        path = folder / f"shard_{s:05d}.safetensors"
        if path.is_file():
            bar.update(sum(len(e["input_ids"]) for e in shard))
            continue
        parts = {"hidden": [], "base_next": [], "tokens": [], "loss_mask": [], "seq": []}
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
                base_next = model.lm_head(hidden).argmax(-1)  # (B, T)
            for b, (k, e) in enumerate(zip(order[i:j], batch)):
                n = len(e["input_ids"])
                parts["hidden"].append(hidden[b, :n].to(torch.float16).cpu())  # (n, C)
                parts["base_next"].append(base_next[b, :n].to(torch.int32).cpu())
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


# ----------------------------------------------------------------------------------------------
# 2. Loss and metrics

def medusa_loss(logits: torch.Tensor, labels: torch.Tensor, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K, V), labels (B, K) -> (weighted total, per-head CE (K,))."""
    K = logits.shape[1]
    per_head = torch.stack([
        F.cross_entropy(logits[:, k].float(), labels[:, k], ignore_index=IGNORE) if (labels[:, k] != IGNORE).any()
        else logits.new_zeros(()) for k in range(K)
    ])  # (K,)
    weights = torch.tensor([decay ** k for k in range(K)], device=logits.device)
    return (weights * per_head).sum(), per_head


@torch.no_grad()
def evaluate_heads(heads: MedusaHeads, lm_head: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 512) -> list[dict]:
    """Per head: CE loss and top-1..5 accuracy over positions where the head has a label."""
    K = labels.shape[1]
    loss_sum = torch.zeros(K); hits = torch.zeros(K, TOPK_ACC); count = torch.zeros(K)
    device = lm_head.device
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i: i + chunk].to(device=device, dtype=lm_head.dtype)  # (b, C)
        y = labels[i: i + chunk].to(device)  # (b, K)
        logits = heads(h, lm_head).float()  # (b, K, V)
        valid = y != IGNORE  # (b, K)
        ce = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")  # (b, K)
        loss_sum += (ce * valid).sum(0).cpu()
        top = logits.topk(TOPK_ACC, dim=-1).indices  # (b, K, 5)
        match = (top == y.unsqueeze(-1)).cumsum(-1).clamp(max=1) & valid.unsqueeze(-1)  # (b, K, 5)
        hits += match.sum(0).cpu()
        count += valid.sum(0).cpu()
    count = count.clamp(min=1)
    return [{"head": k, "loss": float(loss_sum[k] / count[k]),
             **{f"acc@{j + 1}": float(hits[k, j] / count[k]) for j in range(TOPK_ACC)}} for k in range(K)]


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


def train_heads(cfg: WorkbookConfig, lm_head: torch.Tensor, train_cache: dict, eval_cache: dict, out_dir: str | Path,
                heads_config: HeadsConfig, resume: bool = True, on_eval=None) -> dict:
    """Train heads; every cfg.eval_every steps evaluate, append to out_dir/log.csv, checkpoint.

    An interrupted run (Ctrl-C, a killed kernel) restarts from its last checkpoint when called again
    with the same settings. `on_eval(rows)` is called after each evaluation (live plots).
    Returns {"heads": MedusaHeads, "log": [rows], "seconds": float, "resumed_from": int}."""
    out_dir = Path(out_dir)
    use_cuda = torch.cuda.is_available() and lm_head.is_cuda
    acc = Accelerator(cpu=not use_cuda, mixed_precision=training_precision(cfg.train_precision, use_cuda))
    run_key = fingerprint(dataclasses.asdict(heads_config), cfg.lr, cfg.train_steps, cfg.batch_positions,
                          cfg.loss_decay, cfg.label_source, cfg.seed, cfg.warmup_steps, acc.mixed_precision)
    torch.manual_seed(cfg.seed)
    heads = MedusaHeads(heads_config, base_lm_head=lm_head.float().cpu())
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.train_steps))
    generator = torch.Generator().manual_seed(cfg.seed + acc.process_index)
    state_path = out_dir / "training_state.pt"
    log_path = out_dir / "log.csv"
    start, rows = 0, []
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["run_key"] == run_key:
            heads.load_state_dict(state["heads"]); optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"]); generator.set_state(state["generator"])
            start, rows = state["step"], [r for r in state["log"] if int(r["step"]) <= state["step"]]
            acc.print(f"resuming from step {start} ({state_path})")
        else:
            acc.print(f"{state_path} belongs to other settings: starting afresh")
    heads, optimizer = acc.prepare(heads, optimizer)
    lm_head = lm_head.to(acc.device)  # fp32 for evaluation
    train_lm_head = lm_head.to(torch.bfloat16) if acc.mixed_precision == "bf16" else lm_head  # cast once, not per step

    train_pos, train_labels = head_targets(train_cache, heads_config.num_heads, cfg.label_source)
    eval_pos, eval_labels = head_targets(eval_cache, heads_config.num_heads, "greedy")  # what acceptance checks
    if len(train_pos) == 0 or len(eval_pos) == 0:
        raise ValueError("No assistant positions to train or evaluate on: check the prepared data (notebook 01).")
    pick = torch.randperm(len(eval_pos), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_positions]
    eval_hidden, eval_labels = eval_cache["hidden"][eval_pos[pick]], eval_labels[pick]
    train_hidden = train_cache["hidden"]

    sampler_state = generator.get_state()  # as of the last completed step

    def checkpoint(step: int) -> None:
        unwrapped = acc.unwrap_model(heads)
        if acc.is_main_process:
            save_heads(unwrapped, out_dir, {"step": step, "label_source": cfg.label_source})
            _write_log(log_path, [r for r in rows if int(r["step"]) <= step])
            with atomic_path(state_path) as tmp:
                torch.save({"run_key": run_key, "step": step, "heads": unwrapped.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "generator": sampler_state, "log": [r for r in rows if int(r["step"]) <= step]}, tmp)

    def run_eval(step: int, train_stats: torch.Tensor) -> None:
        heads.eval()
        metrics = evaluate_heads(acc.unwrap_model(heads), lm_head, eval_hidden, eval_labels)
        heads.train()
        for m in metrics:
            rows.append({"step": step, "split": "eval", **m})
            rows.append({"step": step, "head": m["head"], "split": "train", "loss": float(train_stats[m["head"]]),
                         **{f"acc@{j}": "" for j in range(1, TOPK_ACC + 1)}})
        if on_eval is not None and acc.is_main_process:
            on_eval(rows)

    t0 = time.time()
    running = torch.zeros(heads_config.num_heads)
    n_running = 0
    if start == 0:
        run_eval(0, torch.full((heads_config.num_heads,), float("nan")))
    heads.train()
    bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, desc="training heads",
               disable=not acc.is_main_process)
    done = start  # optimisation steps completed
    try:
        for step in bar:
            idx = torch.randint(len(train_pos), (cfg.batch_positions,), generator=generator)  # (B,)
            h = train_hidden[train_pos[idx]].to(device=acc.device, dtype=lm_head.dtype)  # (B, C)
            y = train_labels[idx].to(acc.device)  # (B, K)
            with acc.autocast():
                logits = heads(h, train_lm_head)  # (B, K, V)
                loss, per_head = medusa_loss(logits, y, cfg.loss_decay)
            acc.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
            done, sampler_state = step + 1, generator.get_state()
            running += per_head.detach().float().cpu(); n_running += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
                run_eval(step + 1, running / max(1, n_running))
                running.zero_(); n_running = 0
                checkpoint(step + 1)
    except KeyboardInterrupt:
        checkpoint(done)  # keep what is done; calling again resumes here
        raise
    finally:
        bar.close()
    if start >= cfg.train_steps:
        _write_log(log_path, rows)
    return {"heads": acc.unwrap_model(heads).eval(), "log": rows, "seconds": time.time() - t0, "resumed_from": start}


# ----------------------------------------------------------------------------------------------
# 4. The whole job, as notebook 02 and the CLI run it

def training_examples(cfg: WorkbookConfig, tokenizer, split: str) -> list[dict]:
    from medusa_lib.data import read_prepared, tokenize_all

    conversations = read_prepared(cfg.data_dir, split)
    if split == "train" and cfg.train_records:
        conversations = conversations[: cfg.train_records]
    examples, _ = tokenize_all(tokenizer, conversations, cfg.max_length, desc=f"tokenising {split}")
    return examples


def heads_dir(cfg: WorkbookConfig) -> Path:
    return cfg.data_dir / "heads"


def run_training(cfg: WorkbookConfig, model=None, tokenizer=None, on_eval=None, resume: bool = True) -> dict:
    """Cache hidden states (once) and train heads for `cfg`; the heads land in data/heads/."""
    from medusa_lib.base import load_base

    if model is None:
        model, tokenizer = load_base(cfg.base_model, cfg.device, cfg.dtype)
    caches = {}
    for split in ("train", "eval"):
        examples = training_examples(cfg, tokenizer, split)
        folder = build_hidden_cache(model, examples, cfg.data_dir / "hidden_cache", cfg.cache_batch_tokens,
                                    desc=f"caching {split} hidden states")
        caches[split] = load_hidden_cache(folder)
    heads_config = HeadsConfig.for_base(model, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                                        head_output=cfg.head_output, base_model=cfg.base_model,
                                        data_fingerprint=fingerprint(caches["train"]["tokens"].tolist()[:4096]))
    lm_head = model.get_output_embeddings().weight.detach()
    return train_heads(cfg, lm_head, caches["train"], caches["eval"], heads_dir(cfg), heads_config,
                       resume=resume, on_eval=on_eval)


def train_job(cfg: WorkbookConfig) -> None:
    """Entry point for accelerate.notebook_launcher: every process loads the base and trains."""
    run_training(cfg)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train Medusa heads on cached hidden states of the frozen base.")
    parser.add_argument("--preset", default=None, help="tiny or full (default: $WORKBOOK_PRESET or full)")
    parser.add_argument("--num-heads", type=int); parser.add_argument("--num-layers", type=int)
    parser.add_argument("--head-output", choices=["shared", "own"]); parser.add_argument("--lr", type=float)
    parser.add_argument("--label-source", choices=["greedy", "base", "data"])
    parser.add_argument("--train-precision", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--train-steps", type=int); parser.add_argument("--base-model")
    parser.add_argument("--fresh", action="store_true", help="ignore an earlier checkpoint")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "fresh")}
    cfg = get_config(args.preset, **overrides)
    result = run_training(cfg, resume=not args.fresh)
    for row in result["log"][-2 * cfg.num_heads:]:
        if row["split"] == "eval":
            print(f"head {row['head']}: loss {row['loss']:.3f} top-1 {row['acc@1']:.3f} top-5 {row['acc@5']:.3f}")
    print(f"trained in {result['seconds']:.0f} s; heads in {heads_dir(cfg)}")


if __name__ == "__main__":
    main()
