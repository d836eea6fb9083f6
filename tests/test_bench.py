"""Benchmark helpers: question files, even spread across categories, sizing by replay, aggregation."""

import json

import numpy as np
import pytest
import torch

from medusa_lib.bench import _aggregate, load_questions
from medusa_lib.replay import Replay, choose_plan, monotone_cost, replay_vs_measured, simulate
from medusa_lib.config import get_config
from medusa_lib.tree import rank_accuracy


def test_questions_are_spread_evenly_across_categories(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [f"q{i}"]} for i, c in enumerate(["math"] * 5 + ["code"] * 5 + ["chat"])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    picked = load_questions(path, get_config("tiny"), 5)
    cats = [q["category"] for q in picked]
    assert len(picked) == 5 and cats.count("chat") == 1 and cats.count("math") == 2 and cats.count("code") == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": "not a list"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 1"):
        load_questions(bad, get_config("tiny"), 5)


def synthetic_replay():
    """A 6-token reply: at root 0 the nodes (0,) and (0, 0) are confirmed, at root 3 only (0,)."""
    right = [frozenset({(0,), (0, 0)}), frozenset(), frozenset(), frozenset({(0,)}), frozenset(), frozenset()]
    return Replay(np.array([1, 2, 3]), np.array([10, 11, 12, 13, 14, 15]), right)


def test_simulate_walks_the_reply_and_prices_each_step():
    rep = synthetic_replay()
    cost, heads_s = {1: 0.010, 4: 0.013}, 0.001
    deep = simulate([rep], [(0,), (0, 0)], cost, heads_s, per_depth=True)  # steps at 0 (L=2), 3 (L=1), 5 (L=0)
    assert deep["steps"] == 3 and deep["tau"] == 2.0
    assert deep["tok_per_s"] == pytest.approx(6 / (3 * (0.012 + 2 * heads_s)))  # T=3: 12 ms, two calls (depths)
    assert deep["speedup"] == pytest.approx(6 * 0.010 / (3 * (0.012 + 2 * heads_s)))
    shallow = simulate([rep], [(0,)], cost, heads_s, per_depth=False)  # 0 (L=1), 2, 3 (L=1), 5
    assert shallow["steps"] == 4 and shallow["tau"] == 1.5
    assert shallow["tok_per_s"] == pytest.approx(6 / (4 * (0.011 + heads_s)))


def test_monotone_cost_pools_readings_that_go_down():
    assert monotone_cost({1: 1.0, 2: 2.0, 3: 3.0}) == {1: 1.0, 2: 2.0, 3: 3.0}  # already rising: unchanged
    # 3.0 > 2.0 are pooled to their mean 2.5, which is above the next reading 2.2: all three pooled (2.4)
    assert monotone_cost({1: 1.0, 4: 3.0, 5: 2.0, 6: 2.2, 8: 4.0}) == pytest.approx(
        {1: 1.0, 4: 2.4, 5: 2.4, 6: 2.4, 8: 4.0})
    # simulate prices a 5-token pass like the 4-token one, never below it
    rep = synthetic_replay()
    dip = simulate([rep], [(0,), (0, 0), (1,), (2,)], {1: 0.010, 4: 0.014, 5: 0.012}, 0.0, per_depth=False)
    assert dip["tok_per_s"] == pytest.approx(6 / (dip["steps"] * 0.013))


def test_simulate_takes_the_lookup_chain_where_the_text_repeats():
    prompt = np.array([7, 8, 9, 4, 5, 6])
    rep = Replay(prompt, np.array([7, 8, 9, 4, 1]), [frozenset()] * 5)  # the reply copies the prompt, then departs
    none = simulate([rep], [], {1: 0.01, 8: 0.01}, 0.0, per_depth=False)
    looked = simulate([rep], [], {1: 0.01, 8: 0.01}, 0.0, per_depth=False, lookup=3, min_ngram=1)
    assert none["steps"] == 5
    # root 7: its 1-gram occurred at the prompt's start, chain 8 9 4 all confirmed (L=3); root 1: no lookup
    assert looked["steps"] == 2 and looked["tau"] == 2.5
    # a 2-gram trigger skips root 7 (only "7" recurs) and fires at root 8 ("7 8"): chain 9 4 5, two confirmed
    strict = simulate([rep], [], {1: 0.01, 8: 0.01}, 0.0, per_depth=False, lookup=3, min_ngram=2)
    assert strict["steps"] == 3


def test_choose_plan_trades_tau_against_cost():
    reps = [synthetic_replay()] * 3
    rank_acc = np.array([[0.6, 0.1, 0.05, 0.03, 0.02], [0.4, 0.1, 0.05, 0.03, 0.02]])
    flat, _ = choose_plan(reps, rank_acc, {1: 0.01, 64: 0.0101}, 0.0, per_depth=False, max_budget=4)  # nodes are free
    steep, curve = choose_plan(reps, rank_acc, {1: 0.01, 2: 0.0105, 3: 0.05}, 0.0, per_depth=False, max_budget=4)
    assert flat["nodes"] >= 3 and flat["tau"] == 2.0  # (0,) and (0, 0) both in the tree
    assert steep["nodes"] == 2 and steep["paths"] == [[0]]  # a third node costs more than it brings
    assert [c["nodes"] for c in curve] == [1, 2, 3, 4, 5]


def test_a_draft_rule_is_replayed_and_chosen_where_the_heads_know_when_they_are_right():
    """Heads sure (0.9) exactly where they are right: a rule drafts (0,) and (0, 0) at root 0, (0,)
    alone at root 3 and nothing elsewhere, which no fixed tree can do."""
    from medusa_lib.replay import _Drafts
    from medusa_lib.tree import DraftRule, build_tree
    menu = build_tree([(0,), (0, 0)], topk=5, num_heads=2)
    probs = np.full((6, 3), 0.1)  # (R, N) own probabilities; node 0 is the root
    probs[0, 1:] = 0.9
    probs[3, 1] = 0.9
    rep = Replay(synthetic_replay().prompt, synthetic_replay().reply, synthetic_replay().right, probs)
    cost = {1: 0.010, 2: 0.0105, 3: 0.012}
    sure = simulate([rep], menu.paths, cost, 0.0, per_depth=False, rule=DraftRule(2, 0.5), drafts=_Drafts([rep], menu))
    assert sure["steps"] == 3 and sure["tok_per_s"] == pytest.approx(6 / (0.012 + 0.0105 + 0.010))  # T = 3, 2, 1
    # sequential heads draft the whole menu in one call: every step that asks them pays for both depths,
    # also where the rule keeps depth 0's node alone (root 3) or nothing (the last step)
    priced = simulate([rep], menu.paths, cost, 0.001, per_depth=True, rule=DraftRule(2, 0.5), drafts=_Drafts([rep], menu))
    assert priced["tok_per_s"] == pytest.approx(6 / (0.012 + 0.0105 + 0.010 + 3 * 2 * 0.001))
    none = simulate([rep], menu.paths, cost, 0.001, per_depth=True, rule=DraftRule(0), drafts=_Drafts([rep], menu))
    assert none["tok_per_s"] == pytest.approx(6 / (6 * 0.010))  # budget 0: the heads are not asked
    best, _ = choose_plan([rep], rank_accuracy(np.array([[0.6, 0.7, 0.8, 0.9, 1.0]] * 2)), cost, 0.0, per_depth=False,
                          max_budget=2, menu=menu)
    static, _ = choose_plan([rep], rank_accuracy(np.array([[0.6, 0.7, 0.8, 0.9, 1.0]] * 2)), cost, 0.0, per_depth=False,
                            max_budget=2)
    assert best["rule"] is not None and best["rule"]["min_prob"] > 0.1 and best["tok_per_s"] == pytest.approx(sure["tok_per_s"])
    assert static["tok_per_s"] < best["tok_per_s"]
    with pytest.raises(ValueError, match="drafts"):
        simulate([rep], menu.paths, cost, 0.0, per_depth=False, rule=DraftRule(2))
    with pytest.raises(ValueError, match="probabilities"):
        _Drafts([synthetic_replay()], menu)


def test_choose_plan_cuts_the_menu_where_the_deeper_heads_only_cost():
    """Sequential heads sure of (0, 0) at every root and never right: a rule on the full menu still
    runs both depths every step, a rule on the menu cut at depth 1 runs one (tree.to_depth)."""
    from medusa_lib.replay import _Drafts
    from medusa_lib.tree import DraftRule, build_tree, to_depth
    menu = build_tree([(0,), (0, 0)], topk=5, num_heads=2)
    shallow = to_depth(menu, 1)
    assert shallow.paths == ((0,),) and np.array_equal(shallow.tree_indices, menu.tree_indices[:2])
    right = [frozenset({(0,)}), frozenset(), frozenset(), frozenset({(0,)}), frozenset(), frozenset()]
    probs = np.full((6, 3), 0.9)  # (R, N): node 2 = (0, 0) always sure
    probs[[1, 2, 4, 5], 1] = 0.1  # node 1 = (0,) sure exactly where it is right
    rep = Replay(np.array([1, 2, 3]), np.arange(10, 16), right, probs)
    cost, heads_s, rank_acc = {1: 0.010, 2: 0.011, 3: 0.012}, 0.002, rank_accuracy(np.array([[0.6, 0.7, 0.8, 0.9, 1.0]] * 2))
    best, _ = choose_plan([rep], rank_acc, cost, heads_s, per_depth=True, max_budget=2, menu=menu)
    cut = simulate([rep], shallow.paths, cost, heads_s, per_depth=True, rule=DraftRule(1, 0.5), drafts=_Drafts([rep], shallow))
    assert best["paths"] == [[0]] and best["rule"] is not None and 0.1 < best["rule"]["min_prob"] <= 0.9
    assert cut["steps"] == 4 and best["tok_per_s"] == pytest.approx(cut["tok_per_s"])  # T = 2, 1, 2, 1; one depth each
    assert best["tok_per_s"] == pytest.approx(6 / (0.011 + 0.010 + 0.011 + 0.010 + 4 * heads_s))
    full = simulate([rep], menu.paths, cost, heads_s, per_depth=True, rule=DraftRule(1, 0.5), drafts=_Drafts([rep], menu))
    assert full["tok_per_s"] == pytest.approx(6 / (0.042 + 4 * 2 * heads_s))  # the same drafts, two depths a step
    with pytest.raises(ValueError, match="depth must be 1..2"):
        to_depth(menu, 3)


def test_choose_plan_replays_a_rule_that_covers_its_menu_once():
    """A DraftRule whose budget reaches past a menu's nodes drafts the whole menu (above its floor),
    whatever the budget: choose_plan replays it once, under the smallest such budget, so the fastest
    plan of a larger budget is one that really drafts that many nodes."""
    from medusa_lib.replay import _budgets, _Drafts
    from medusa_lib.tree import DraftRule, build_tree
    assert _budgets(2, 15) == [1, 2] and _budgets(7, 15) == [1, 2, 3, 4, 5, 6, 8] and _budgets(20, 5) == [1, 2, 3, 4, 5]
    menu = build_tree([(0,), (0, 0)], topk=5, num_heads=2)
    probs = np.full((6, 3), 0.9)
    probs[[1, 2, 4, 5], 1] = 0.1
    rep = Replay(np.array([1, 2, 3]), np.arange(10, 16), synthetic_replay().right, probs)
    cost, heads_s = {1: 0.010, 2: 0.011, 3: 0.012, 9: 0.100}, 0.002  # big trees are dear
    for p in (0.0, 0.5):  # the premise: past the menu's 2 nodes the budget changes nothing
        covered = simulate([rep], menu.paths, cost, heads_s, True, rule=DraftRule(2, p), drafts=_Drafts([rep], menu))
        assert simulate([rep], menu.paths, cost, heads_s, True, rule=DraftRule(8, p), drafts=_Drafts([rep], menu)) == covered
    rank_acc = rank_accuracy(np.array([[0.6, 0.7, 0.8, 0.9, 1.0]] * 2))
    _, per_budget = choose_plan([rep], rank_acc, cost, heads_s, per_depth=True, max_budget=8, menu=menu, progress=False)
    assert all(o["rule"] is None or o["rule"]["budget"] <= len(o["paths"]) for o in per_budget)
    assert [o["nodes"] for o in per_budget] == list(range(1, 10)) and per_budget[8]["rule"] is None


def test_replay_vs_measured_sets_each_promise_beside_the_benchmark():
    rep = synthetic_replay()
    cost = {1: 0.010, 4: 0.013}
    plan = simulate([rep], [(0,), (0, 0)], cost, 0.001, per_depth=True)  # tau 2, a step priced 12 + 2 ms
    result = {"methods": {"ort": {"decode_tok_per_s": 80.0, "tau": 1.0, "speedup_vs_ort": 1.0},
                          "hydra_tree": {"decode_tok_per_s": 100.0, "tau": 1.6, "speedup_vs_ort": 1.25}}}
    table = replay_vs_measured({"hydra_tree": plan, "medusa_tree": plan}, result, cost)
    assert list(table.index) == ["ort", "hydra_tree"]  # a method the benchmark did not run has no row
    row = table.to_dict("index")
    assert row["ort"]["replayed ms/step"] == pytest.approx(10.0)  # the curve's one-token pass
    assert row["ort"]["measured ms/step"] == pytest.approx(12.5)  # 1000 / 80 tok/s: a busier machine
    assert row["hydra_tree"]["replayed ms/step"] == pytest.approx(14.0)
    assert row["hydra_tree"]["measured ms/step"] == pytest.approx(16.0)  # 1.6 tokens a step at 100 tok/s
    assert row["hydra_tree"]["replayed tau"] == 2.0 and row["hydra_tree"]["measured speedup"] == 1.25


def test_aggregate_counts_tokens_over_time():
    recs = [{"new_tokens": 10, "decode_s": 1.0, "e2e_s": 2.0, "tau": 2.0, "identical_to_ort": True},
            {"new_tokens": 30, "decode_s": 1.0, "e2e_s": 2.0, "tau": 3.0, "identical_to_ort": False}]
    agg = _aggregate(recs)
    assert agg["decode_tok_per_s"] == 20.0 and agg["e2e_tok_per_s"] == 10.0
    assert agg["tau"] == 2.5 and agg["identical_to_ort"] == 1 and agg["prompts"] == 2
    # with steps recorded, tau is pooled over steps: a short reply with long steps weighs by its steps
    recs[0]["accept_lens"], recs[1]["accept_lens"] = [3, 3], [0] * 10  # tau 4.0 on 2 steps, 1.0 on 10
    assert _aggregate(recs)["tau"] == pytest.approx((8 + 10) / 12)


def test_a_bad_out_path_fails_before_any_benchmark_work(tmp_path, monkeypatch):
    from medusa_lib import bench
    ran = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: ran.append(1) or {})
    with pytest.raises(IsADirectoryError, match="is a directory: give a file name"):
        bench.main(["--preset", "tiny", "--out", str(tmp_path)])
    locked = tmp_path / "locked"
    locked.mkdir(); locked.chmod(0o500)
    import os
    if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
        locked = tmp_path / "a_file"
        locked.write_text("x")
    with pytest.raises(PermissionError, match="cannot be written"):
        bench.main(["--preset", "tiny", "--out", str(locked / "results.json")])
    assert ran == []


def test_zero_prompts_or_tokens_are_refused_not_replaced_by_the_default():
    from medusa_lib.bench import run_benchmark
    with pytest.raises(ValueError, match=r"at least one prompt and one new token \(limit=0"):
        run_benchmark(get_config("tiny"), limit=0)
    with pytest.raises(ValueError, match=r"max_new_tokens=0"):
        run_benchmark(get_config("tiny"), max_new_tokens=0)




def test_heads_from_another_preset_are_copied_beside_its_own_with_trees_of_its_size(tmp_path, monkeypatch):
    import pandas as pd

    from medusa_lib.bench import reuse_heads
    from medusa_lib.files import read_json
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path / "data"))
    source = tmp_path / "data" / "full"
    for kind in ("heads", "hydra"):
        folder = source / kind
        folder.mkdir(parents=True)
        (folder / "heads_config.json").write_text('{"num_heads": 3}')
        (folder / "heads.safetensors").write_bytes(b"weights of " + kind.encode())
        rows = [{"split": "eval", "step": 100, "head": h, **{f"acc@{k}": min(1.0, 0.5 / (h + 1) + 0.05 * k) for k in range(1, 6)}}
                for h in range(3)]
        pd.DataFrame(rows).to_csv(folder / "log.csv", index=False)
    cfg = get_config("gpu", tree_nodes=7)
    args = reuse_heads(cfg, source)
    assert args["heads"] == cfg.data_dir / "heads-from-full" / "heads"
    assert (args["hydra_heads"] / "heads.safetensors").read_bytes() == b"weights of hydra"
    for key in ("tree", "hydra_tree"):
        assert len(read_json(args[key])["paths"]) == 7  # the gpu preset's tree size (root excluded), not the source's
    assert not (cfg.data_dir / "heads").exists() and not (cfg.data_dir / "hydra").exists()  # notebook 02's folders untouched
    assert reuse_heads(cfg, source) == args  # unchanged source: the copy is reused as it is
    (source / "heads" / "heads.safetensors").write_bytes(b"retrained")
    assert reuse_heads(cfg, source) == args
    assert (args["heads"] / "heads.safetensors").read_bytes() == b"retrained"  # a stale copy is made again, never reused
    assert (args["hydra_heads"] / "heads.safetensors").read_bytes() == b"weights of hydra" and args["tree"].is_file()
    with pytest.raises(FileNotFoundError, match="lacks"):
        reuse_heads(cfg, tmp_path / "data" / "tiny")


def test_heads_are_timed_each_right_after_a_verification_pass_as_the_loop_calls_them(monkeypatch):
    from types import SimpleNamespace

    from medusa_lib import decoding
    from medusa_lib.bench import heads_seconds
    calls = []
    monkeypatch.setattr(decoding, "run_base", lambda rt, ids, positions, bias, n: calls.append(("pass", len(ids), n)))
    monkeypatch.setattr(decoding, "propose", lambda rt, root, hidden, tree: calls.append(("heads", tree.size)))
    rt = SimpleNamespace(info={"topk": 5, "num_heads": 3}, hidden_buf=np.zeros((1, 4, 8), dtype=np.float32),
                         np_dtype=np.float32)
    assert heads_seconds(rt, reps=4, prefix=30) >= 0
    assert calls == [("pass", 1, 30), ("heads", 2)] * 5  # a pass before every call (the first call untimed)


def test_results_record_paths_inside_the_clone_and_the_machine_by_cpu(tmp_path, monkeypatch):
    from medusa_lib.bench import cpu_description, portable
    from medusa_lib.config import repo_root
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path / "scratch" / "data"))
    assert portable(repo_root() / "static" / "questions.jsonl") == "static/questions.jsonl"
    assert portable(tmp_path / "scratch" / "data" / "full" / "trees" / "tree.json") == "data/full/trees/tree.json"
    assert portable(tmp_path / "elsewhere" / "plan.json") == "(outside the repository)/plan.json"
    assert str(tmp_path) not in portable(tmp_path / "elsewhere" / "plan.json") and portable(None) is None
    cpu = cpu_description()
    assert cpu["cpu_model"] and isinstance(cpu["cpu_flags"], list)


def test_committed_results_hold_no_absolute_paths():
    import re
    from medusa_lib.config import repo_root
    for path in (repo_root() / "static").rglob("*.json"):
        found = re.findall(r'"(/(?:root|tmp|home|work|Users|mnt)/[^"]*)"', path.read_text())
        assert not found, (path.name, found[:3])


def test_question_files_that_would_mislead_are_refused_or_read_right(tmp_path):
    cfg = get_config("tiny")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question_id": 1, "category": "math", "turns": ["q"]}).encode() + b"\n")
    assert load_questions(bom, cfg, 5)[0]["question_id"] == 1  # the byte-order mark is not part of the first line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no questions"):  # was: a results file of 0 prompts, 0 tok/s
        load_questions(empty, cfg, 5)
    for category in ("null", "[\"a\"]"):
        bad = tmp_path / "cat.jsonl"
        bad.write_text(f'{{"question_id": 1, "category": {category}, "turns": ["q"]}}\n')
        with pytest.raises(ValueError, match="cat.jsonl, line 1: 'category' must be a string"):
            load_questions(bad, cfg, 5)


def test_a_capacity_stop_is_not_a_divergence_and_flags_no_method_reads_are_refused():
    from medusa_lib.bench import agrees, run_benchmark
    assert agrees([1, 2, 3], "capacity", [1, 2, 3, 4, 5], "max_new_tokens")  # cut for room: same tokens so far
    assert not agrees([1, 2, 9], "capacity", [1, 2, 3, 4, 5], "max_new_tokens")
    assert not agrees([1, 2, 3], "eos", [1, 2, 3, 4], "max_new_tokens")  # a real difference stays one
    cfg = get_config("tiny")
    for kwargs, flag in ((dict(tree_file="t.json"), "--tree"), (dict(pld_plan="p.json"), "--pld-plan"),
                         (dict(hydra_tree="h.json"), "--hydra-tree")):
        with pytest.raises(ValueError, match=f"{flag} given, but no method in \\['ort'\\] uses it"):
            run_benchmark(cfg, methods=["ort"], progress=False, **kwargs)


def test_trees_plans_and_exports_sized_for_other_heads_are_refused(tmp_path, monkeypatch):
    from medusa_lib.export import resolve_export_dir
    from medusa_lib.files import write_json
    from medusa_lib.heads import checkpoint_fingerprint
    from medusa_lib.tree import check_sized_for, save_tree
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "heads_config.json").write_text("{}")
    (heads / "heads.safetensors").write_bytes(b"first training")
    save_tree(tmp_path / "tree.json", [(0,)], 5, heads=heads)
    check_sized_for(tmp_path / "tree.json", checkpoint_fingerprint(heads))  # the same heads: fine
    check_sized_for(tmp_path / "tree.json", None)  # an export that does not say which heads: read as before
    (heads / "heads.safetensors").write_bytes(b"trained again")
    with pytest.raises(ValueError, match="tree.json was sized for other heads than the export holds now.*size it anew"):
        check_sized_for(tmp_path / "tree.json", checkpoint_fingerprint(heads))
    # data/<preset>/onnx exported (notebook 04) from heads trained again since: refused, naming what to run
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path / "data"))
    cfg = get_config("tiny")
    from medusa_lib.train import heads_dir
    ckpt = heads_dir(cfg)
    ckpt.mkdir(parents=True)
    (ckpt / "heads_config.json").write_text("{}")
    (ckpt / "heads.safetensors").write_bytes(b"v1")
    onnx = cfg.data_dir / "onnx"
    onnx.mkdir()
    info = {k: 1 for k in ("topk", "num_layers", "kv_heads", "head_dim", "hidden_size", "vocab_size", "num_heads")}
    write_json(onnx / "export_info.json", {**info, "dtype": "float32", "files": {}, "eos_token_ids": [],
                                           "heads_fingerprint": checkpoint_fingerprint(ckpt)})
    assert resolve_export_dir(cfg) == onnx
    # fp16 asked of fp32 graphs (export_dtype set after notebook 04 ran): refused, not decoded in fp32
    with pytest.raises(ValueError, match="onnx holds float32 graphs but export_dtype is 'float16': run notebook 04"):
        resolve_export_dir(cfg.replace(export_dtype="float16"))
    (ckpt / "heads.safetensors").write_bytes(b"v2")
    with pytest.raises(ValueError, match="onnx was exported from other heads than .* holds now.*notebook 04"):
        resolve_export_dir(cfg)


def test_a_method_on_a_quantised_graph_is_judged_against_plain_decoding_on_that_graph(tmp_path):
    from medusa_lib.bench import _pairs, plain_of, quantised_plan_files
    from medusa_lib.config import method_known, split_method
    assert split_method("hydra_pld@q4") == ("hydra_pld", "q4") and split_method("ort") == ("ort", "fp32")
    assert plain_of("hydra_pld@q4") == "ort@q4" and plain_of("medusa_tree") == "ort" and plain_of("llamacpp") is None
    assert method_known("ort@int8") and not method_known("ort_ref@q4") and not method_known("llamacpp@q4")
    with pytest.raises(ValueError, match="write WEIGHTS=FILE"):
        _pairs("--quantised-plan", ["data/full/trees/tree_hydra_pld_q4.json"])
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    with pytest.raises(ValueError, match="hydra_pld@q4 is not among the methods"):  # a plan no method reads
        quantised_plan_files(get_config("tiny"), ["ort", "ort@q4"], {"q4": str(plan)})
    assert quantised_plan_files(get_config("tiny"), ["hydra_pld@q4"], {"q4": str(plan)}) == {"hydra_pld@q4": plan}


def test_chain_plans_for_a_quantised_graph_are_chains_with_the_root_alone_on_lookup_steps():
    rank_acc = rank_accuracy(np.array([[0.6, 0.7, 0.8, 0.85, 0.9], [0.5, 0.6, 0.7, 0.8, 0.85]]))
    cost = {1: 0.010, 2: 0.013, 3: 0.016, 4: 0.019, 8: 0.031}  # each token of a pass dear, as on a quantised CPU graph
    best, per_budget = choose_plan([synthetic_replay()] * 3, rank_acc, cost, 0.001, True, (0, 2), chains=True)
    assert len(per_budget) == 3  # no deeper than the heads
    for option in per_budget:
        assert option["paths"] == [[0] * d for d in range(1, option["nodes"])]  # the top-ranked chain of its depth
        assert option["rule"] is None and option["lookup_paths"] in (None, [])


def test_the_cost_curve_times_each_width_after_its_like_and_one_token_passes_back_to_back(monkeypatch):
    """Decoding runs narrow passes in a row, so each timed pass follows an untimed one of its width,
    the widths taking turns round after round; then the T=1 price plain decoding pays, one-token passes
    in a row. The schedule of passes is what this checks, not their time."""
    import medusa_lib.decoding
    from medusa_lib.bench import verify_cost_curve

    widths = []
    monkeypatch.setattr(medusa_lib.decoding, "run_base", lambda rt, ids, *a, **k: widths.append(len(ids)))

    class Runtime:
        def bias(self, T, n):
            return torch.zeros(1, 1, T, n + T)

    cost = verify_cost_curve(Runtime(), (1, 2, 4), reps=5)
    assert sorted(cost) == [1, 2, 4]
    assert widths == [1, 1, 2, 2, 4, 4] * 5 + [1] * 5
    widths.clear()
    verify_cost_curve(Runtime(), (2, 4), reps=3)  # no T=1 asked: nothing extra
    assert widths == [2, 2, 4, 4] * 3


def test_a_plan_without_heads_nodes_is_described_in_words():
    from medusa_lib.replay import describe_plan
    lookup_only = {"rule": None, "nodes": 1, "lookup": 5, "min_ngram": 3, "lookup_rule": None, "tau": 1.5, "speedup": 1.1}
    assert describe_plan(lookup_only).startswith("no heads' nodes (the root alone), lookup 5 tokens on a repeated 3-gram;")
    ruled = {**lookup_only, "rule": {"budget": 5, "min_prob": 0.0}, "lookup_rule": {"budget": 0, "min_prob": 0.0},
             "paths": [[0], [1], [0, 0]]}
    assert "at most 5 of the menu's nodes" in describe_plan(ruled) and "then no heads' nodes" in describe_plan(ruled)
    assert "a menu of 3 nodes, 2 depths" in describe_plan(ruled)
    assert describe_plan({**lookup_only, "nodes": 4, "lookup": 0}).startswith("4 nodes;")
