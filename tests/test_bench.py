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
