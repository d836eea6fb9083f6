"""Data: recovery of cut files, role normalisation, split, assistant-only loss mask."""

import json

import pytest

from medusa_lib.data import (first_prompt, load_conversations, normalise_record, read_jsonl, read_prepared,
                             repair_jsonl_tail, self_distill, split_conversations, tokenize_conversation, write_jsonl)

RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How can I help?"}]},
    {"id": "b", "conversations": [{"from": "user", "value": "2+2?"}, {"from": "chatgpt", "value": "4, naïvely — and “exactly”."}]},
    {"id": "c", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour"},
                                  {"from": "bard", "value": "Blue."}, {"from": "human", "value": "Another"},
                                  {"from": "bing", "value": "Red."}]},
    {"id": "d", "conversations": [{"from": "human", "value": "Last one"}, {"from": "assistant", "value": "Fine."}]},
]


def cut_file(tmp_path, cut_inside: int):
    """The records as a JSON array, cut in the middle of record `cut_inside`; returns (path, start byte)."""
    head = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[:cut_inside]) + ",\n"
    partial = json.dumps(RECORDS[cut_inside], ensure_ascii=False)
    data = (head + partial[: len(partial) // 2]).encode()
    path = tmp_path / "cut.json"
    path.write_bytes(data)
    return path, len(head.encode())


def test_recovers_complete_records_from_a_cut_file(tmp_path):
    path, start = cut_file(tmp_path, 3)
    convs, report = load_conversations(path)
    assert [c["id"] for c in convs] == ["a", "b", "c"]
    assert report.records_read == 3 and report.kept == 3
    assert report.truncated_at_byte == start  # where the half record begins
    assert convs[1]["messages"][1]["content"] == RECORDS[1]["conversations"][1]["value"]


def test_complete_file_and_jsonl(tmp_path):
    full = tmp_path / "full.json"
    full.write_text(json.dumps(RECORDS))
    convs, report = load_conversations(full)
    assert len(convs) == 4 and report.truncated_at_byte is None
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert [c["id"] for c in load_conversations(jsonl)[0]] == ["a", "b", "c", "d"]


def test_packaged_sharegpt_is_recovered():
    convs, report = load_conversations(None, max_records=10)
    assert report.records_read > 17_000 and report.truncated_at_byte is not None
    assert report.truncated_at_byte < report.file_bytes and len(convs) == 10


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_conversations(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "conversations": []} {oops}, {"id": "y"}]')
    with pytest.raises(ValueError, match="bad.json.*malformed JSON"):
        load_conversations(bad)


def test_roles_normalise_and_skips_are_counted(tmp_path):
    msgs, reason = normalise_record(RECORDS[2])
    assert reason is None and [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    bad = [
        {"id": "1", "conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        {"id": "3", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "4", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
        {"id": "5"},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(RECORDS[:1] + bad))
    convs, report = load_conversations(path)
    assert len(convs) == 1
    assert report.skipped == {"no assistant turn": 1, "empty turn": 1, "unknown role": 1, "non-string value": 1,
                              "no conversations": 1}


def test_split_is_deterministic_and_eval_never_empty():
    convs = [{"id": str(i), "messages": []} for i in range(3)]
    train, eval_ = split_conversations(convs, 0.05, seed=0)
    assert len(eval_) == 1 and len(train) == 2
    assert split_conversations(convs, 0.05, seed=0) == (train, eval_)
    big = [{"id": str(i), "messages": []} for i in range(1000)]
    t1, e1 = split_conversations(big, 0.1, seed=1)
    assert len(e1) == 100 and not {c["id"] for c in t1} & {c["id"] for c in e1}


def test_mask_selects_exactly_the_assistant_turns(tokenizer):
    for record in RECORDS:
        messages, _ = normalise_record(record)
        ex = tokenize_conversation(tokenizer, messages, max_length=10_000)
        chosen = [t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
        assert tokenizer.decode(chosen, skip_special_tokens=True) == "".join(
            m["content"] for m in messages if m["role"] == "assistant")
        assert ex["cut"] is None
        # the end-of-turn token after each reply is trained too, so the heads learn to stop
        assert sum(1 for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m and t in tokenizer.all_special_ids) == \
            sum(m["role"] == "assistant" for m in messages)


def test_long_conversations_are_cut_at_a_turn_boundary(tokenizer):
    messages, _ = normalise_record(RECORDS[2])
    full = tokenize_conversation(tokenizer, messages, max_length=10_000)
    ex = tokenize_conversation(tokenizer, messages, max_length=len(full["input_ids"]) - 2)
    assert ex["cut"] == "turn"
    text = tokenizer.decode(ex["input_ids"])
    assert text.endswith("Blue.<|im_end|>") and "Red." not in text
    tiny = tokenize_conversation(tokenizer, messages, max_length=5)
    assert tiny["cut"] == "mid_turn" and len(tiny["input_ids"]) == 5


def test_a_reply_cut_short_gets_no_end_of_turn_label(tokenizer):
    messages, _ = normalise_record(RECORDS[0])
    closed = tokenize_conversation(tokenizer, messages, 10_000)
    cut = tokenize_conversation(tokenizer, messages, 10_000, last_turn_complete=False)
    assert closed["input_ids"] == cut["input_ids"]
    assert sum(closed["loss_mask"]) == sum(cut["loss_mask"]) + 1
    assert tokenizer.decode([t for t, m in zip(cut["input_ids"], cut["loss_mask"]) if m]) == messages[-1]["content"]


def test_first_prompt_keeps_system_drops_earlier_assistant_turns():
    msgs = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "GPT text"},
            {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert first_prompt(msgs) == [msgs[0], msgs[2]]
    with pytest.raises(ValueError, match="no user turn"):
        first_prompt(msgs[:2])


def test_self_distillation_redoes_rows_written_for_another_prompt(tmp_path, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=tokenizer.eos_token_id)).eval()
    convs = [{"id": "x", "messages": [{"role": "assistant", "content": "Earlier GPT text"}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}]},
             {"id": "y", "messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}]
    out = tmp_path / "distilled.jsonl"
    stale = {"id": "x", "messages": convs[0]["messages"][:2] + [{"role": "assistant", "content": "old"}]}
    out.write_text(json.dumps(stale) + "\n")
    rows = self_distill(model, tokenizer, convs, out, max_new_tokens=4, batch_size=2)
    assert [r["messages"][:-1] for r in rows] == [[convs[0]["messages"][1]], [convs[1]["messages"][0]]]
    assert all(r["complete"] in (True, False) for r in rows)
    assert [r["id"] for r in read_jsonl(out)] == ["x", "y"]  # the stale row is gone from the file
    assert self_distill(model, tokenizer, convs, out, max_new_tokens=4, batch_size=2) == rows  # resumes, redoes nothing


def test_interrupted_jsonl_half_line_is_skipped_by_readers_and_cut_only_by_the_appender(tmp_path):
    path = tmp_path / "distilled.jsonl"
    text = '{"id": "a"}\n{"id": "b"}\n{"id": "c", "mess'
    path.write_text(text)
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert path.read_text() == text  # a read never rewrites the file
    repair_jsonl_tail(path)
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_a_damaged_line_in_the_middle_is_an_error_and_loses_nothing(tmp_path):
    path = tmp_path / "distilled.jsonl"
    text = '{"id": "a"}\n{"id": "b", oops\n{"id": "c"}\n{"id": "d"}\n'
    path.write_text(text)
    with pytest.raises(ValueError, match=r"distilled.jsonl, line 2: not valid JSON.*rows after it are kept"):
        read_jsonl(path)
    repair_jsonl_tail(path)  # the appender only ever touches a half-written last line
    assert path.read_text() == text


def _prepared(tmp_path, train, eval_, distilled_train):
    folder = tmp_path / "prepared"
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", eval_)
    write_jsonl(folder / "distilled_train.jsonl", distilled_train)
    return tmp_path


def _conv(cid, question, answer="A"):
    return {"id": cid, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_distilled_rows_of_another_split_are_never_returned(tmp_path):
    # the distilled file was written when "q" was a training conversation; another seed moved it to eval
    stale = {"id": "q", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "base"}]}
    edited = {"id": "p", "messages": [{"role": "user", "content": "old prompt"}, {"role": "assistant", "content": "base"}]}
    kept = {"id": "r", "messages": [{"role": "user", "content": "R?"}, {"role": "assistant", "content": "base"}]}
    data = _prepared(tmp_path, [_conv("r", "R?"), _conv("p", "new prompt")], [_conv("q", "Q?")], [stale, edited, kept])
    train = read_prepared(data, "train")
    assert [c["id"] for c in train] == ["r", "r", "p"]  # the distilled "r", then the data's own
    assert train[0]["messages"][-1]["content"] == "base"
    assert [c["id"] for c in read_prepared(data, "eval")] == ["q"]  # the eval conversation, not the stale row
    assert len(read_jsonl(data / "prepared" / "distilled_train.jsonl")) == 3  # kept on disk for reuse


def test_repeated_ids_get_their_own_and_distillation_refuses_duplicates(tmp_path, tokenizer):
    path = tmp_path / "dup.json"
    recs = [RECORDS[0], {**RECORDS[1], "id": "a"}, {**RECORDS[3], "id": "a"}]
    path.write_text(json.dumps(recs))
    convs, report = load_conversations(path)
    assert [c["id"] for c in convs] == ["a", "a#2", "a#3"] and report.renamed_ids == 2
    with pytest.raises(ValueError, match="id 'x' occurs twice"):
        self_distill(None, tokenizer, [_conv("x", "1"), _conv("x", "2")], tmp_path / "d.jsonl", 4, 2)


def test_atomic_writes_leave_no_temp_file_and_usual_permissions(tmp_path):
    import os

    from medusa_lib.files import atomic_path, write_json
    write_json(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0); os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_json_files_with_a_byte_order_mark_load_and_a_non_list_top_level_is_named(tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    convs, report = load_conversations(bom)
    assert [c["id"] for c in convs] == ["a", "b", "c", "d"] and report.truncated_at_byte is None
    obj = tmp_path / "object.json"
    obj.write_text(json.dumps({"data": RECORDS}))
    with pytest.raises(ValueError, match=r"object.json: the top level is an object, but a .json data file must be a list"):
        load_conversations(obj)


def test_the_mix_table_counts_each_source_and_what_the_cut_removes(tokenizer):
    from medusa_lib.data import marked_text, mix_table
    messages, _ = normalise_record(RECORDS[2])
    whole = tokenize_conversation(tokenizer, messages, max_length=None)
    distilled = {"id": "d", "messages": messages[:3], "complete": True}  # system, user, "Blue."
    rows = [distilled, {"id": "s", "messages": messages}]
    table = {r["source"].split()[0]: r for r in mix_table(tokenizer, rows, max_length=len(whole["input_ids"]) - 2)}
    assert table["ShareGPT"]["tokens as written"] == len(whole["input_ids"]) and table["ShareGPT"]["cut at max_length"] == 1
    assert table["ShareGPT"]["tokens kept"] < table["ShareGPT"]["tokens as written"]
    assert table["self-distilled"]["conversations"] == 1 and table["self-distilled"]["cut at max_length"] == 0
    ex = tokenize_conversation(tokenizer, messages[:3], max_length=None)
    assert table["self-distilled"]["trained tokens"] == sum(ex["loss_mask"])
    text = marked_text(tokenizer, ex)
    assert text.count("«") == text.count("»") == 1  # one reply, one marked span
    assert text[text.index("«") + 1: text.index("»")] == messages[2]["content"] + "<|im_end|>"


def test_a_distilled_row_without_messages_is_named_not_a_keyerror(tmp_path):
    import json as _json

    from medusa_lib.data import read_prepared
    folder = tmp_path / "prepared"
    folder.mkdir()
    conv = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (folder / "train.jsonl").write_text(_json.dumps(conv) + "\n")
    good = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    (folder / "distilled_train.jsonl").write_text(_json.dumps(good) + "\n" + _json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"distilled_train.jsonl, row 2 \(id 'b'\): not a distilled reply.*Delete that line"):
        read_prepared(tmp_path, "train")
    (folder / "distilled_train.jsonl").write_text(_json.dumps(good) + "\n")
    assert read_prepared(tmp_path, "train")[0]["messages"][-1]["content"] == "hey"


def test_reply_stats_counts_the_self_distilled_replies_only():
    from medusa_lib.data import reply_stats

    class Words:  # a tokenizer whose tokens are words
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    rows = [{"id": "a", "complete": True, "messages": [{"role": "user", "content": "one two"},
                                                       {"role": "assistant", "content": "three four five"}]},
            {"id": "b", "complete": False, "messages": [{"role": "user", "content": "six"},
                                                        {"role": "assistant", "content": "seven"}]},
            {"id": "c", "messages": [{"role": "user", "content": "ShareGPT's own"}, {"role": "assistant", "content": "x"}]}]
    stats = reply_stats(Words(), rows)
    assert stats["prompt tokens"].tolist() == [2, 1] and stats["reply tokens"].tolist() == [3, 1]
    assert stats["ended"].tolist() == [True, False]
