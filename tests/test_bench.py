"""Benchmark helpers: question files, even spread across categories, tree sizing, aggregation."""

import json

import numpy as np
import pytest

from medusa_lib.bench import _aggregate, load_questions, size_tree
from medusa_lib.config import get_config


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


def test_size_tree_trades_tau_against_cost():
    rank_acc = np.array([[0.6, 0.1, 0.05, 0.03, 0.02], [0.4, 0.1, 0.05, 0.03, 0.02]])
    flat = size_tree({1: 0.01, 64: 0.0101}, rank_acc, heads_s=0.0, max_nodes=64)  # GPU-like: nodes are free
    steep = size_tree({1: 0.01, 64: 0.64}, rank_acc, heads_s=0.0, max_nodes=64)  # cost grows with every node
    assert flat["best"]["nodes"] > steep["best"]["nodes"] >= 1
    for r in steep["curve"]:
        assert r["expected_tok_per_s"] == pytest.approx(r["expected_tau"] / r["step_s"])


def test_aggregate_counts_tokens_over_time():
    recs = [{"new_tokens": 10, "decode_s": 1.0, "e2e_s": 2.0, "tau": 2.0, "identical_to_ort": True},
            {"new_tokens": 30, "decode_s": 1.0, "e2e_s": 2.0, "tau": 3.0, "identical_to_ort": False}]
    agg = _aggregate(recs)
    assert agg["decode_tok_per_s"] == 20.0 and agg["e2e_tok_per_s"] == 10.0
    assert agg["tau"] == 2.5 and agg["identical_to_ort"] == 1 and agg["prompts"] == 2


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


def test_sequential_heads_pay_for_one_call_per_depth():
    rank_acc = np.array([[0.6, 0.1, 0.05, 0.03, 0.02], [0.5, 0.1, 0.05, 0.03, 0.02]])
    cost = {1: 0.010, 64: 0.011}
    once = size_tree(cost, rank_acc, heads_s=0.002, max_nodes=8)
    per_depth = size_tree(cost, rank_acc, heads_s=0.002, max_nodes=8, heads_per_depth=True)
    for a, b in zip(once["curve"], per_depth["curve"]):
        depth = max((len(p) for p in a["paths"]), default=0)
        assert b["step_s"] - a["step_s"] == pytest.approx(0.002 * max(0, depth - 1))
