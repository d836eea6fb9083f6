"""ONNX export parity and the ORT Medusa loop on a tiny random Llama: lossless greedy decoding,
EOS and KV-capacity handling, reproducible typical acceptance."""

import numpy as np
import pytest
import torch

from medusa_lib.decoding import accept, generate, load_runtime
from medusa_lib.export import export_medusa, parity_report
from medusa_lib.heads import HeadsConfig, MedusaHeads
from medusa_lib.tree import build_tree, chain_paths

TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)]


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    torch.manual_seed(3)
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3))
    with torch.no_grad():  # small perturbation: heads that are neither identity nor useless
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("onnx")
    export_medusa(tiny_llama, heads, out, topk=4)
    return out


@pytest.fixture
def rt(exported):
    return load_runtime(exported, capacity=256, max_nodes=16)


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


PROMPTS = [[5, 17, 33, 2, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [7], [90, 1, 90, 1, 90, 1]]


def test_ort_matches_pytorch_on_prefill_and_tree_step(tiny_llama, rt):
    tree = build_tree(TREE, topk=4, num_heads=3)
    rng = np.random.default_rng(0)
    for prompt in PROMPTS[:2]:
        rows = parity_report(tiny_llama, rt, prompt, rng.integers(0, 97, tree.size), tree)
        assert len(rows) == 3
        for row in rows:
            assert row["max_abs_diff"] <= 1e-3, row


def test_greedy_medusa_equals_plain_greedy_and_hf(tiny_llama, rt):
    tree = build_tree(TREE, topk=4, num_heads=3)
    accepted = 0
    for prompt in PROMPTS:
        ref = hf_greedy(tiny_llama, prompt, 40)
        plain, plain_stats = generate(rt, prompt, None, 40, eos_token_ids=[])
        medusa, stats = generate(rt, prompt, tree, 40, eos_token_ids=[])
        chain, _ = generate(rt, prompt, build_tree(chain_paths(3), 4, 3), 40, eos_token_ids=[])
        assert plain == ref and medusa == ref and chain == ref
        assert plain_stats.tau == 1.0 and plain_stats.steps == 40
        assert stats.steps == len(stats.accept_lens) and sum(a + 1 for a in stats.accept_lens) >= 40
        accepted += sum(stats.accept_lens)
    assert accepted > 0  # the test exercised acceptance and cache compaction, not only the root


def test_eos_inside_an_accepted_chunk_ends_the_output(tiny_llama, rt):
    tree = build_tree(TREE, topk=4, num_heads=3)
    prompt = PROMPTS[3]
    plain, _ = generate(rt, prompt, None, 40, eos_token_ids=[])
    eos = plain[7]
    medusa, stats = generate(rt, prompt, tree, 40, eos_token_ids=[eos])
    assert medusa == plain[: plain.index(eos) + 1] and stats.stopped == "eos"


def test_kv_capacity_is_never_exceeded(exported):
    small = load_runtime(exported, capacity=24, max_nodes=16)
    tree = build_tree(TREE, topk=4, num_heads=3)
    with pytest.raises(ValueError, match="cannot fit the KV cache of 24 tokens"):
        generate(small, list(range(20)), tree, 10, eos_token_ids=[])
    out, stats = generate(small, PROMPTS[0], tree, 100, eos_token_ids=[])
    assert stats.stopped == "capacity"
    assert stats.prompt_tokens + sum(a + 1 for a in stats.accept_lens) + tree.size > 24
    full = load_runtime(exported, capacity=256, max_nodes=16)
    assert generate(full, PROMPTS[0], None, len(out), eos_token_ids=[])[0] == out


def test_typical_acceptance_is_reproducible_under_a_seed(rt):
    tree = build_tree(TREE, topk=4, num_heads=3)
    a, _ = generate(rt, PROMPTS[1], tree, 30, temperature=0.8, seed=7, eos_token_ids=[])
    b, _ = generate(rt, PROMPTS[1], tree, 30, temperature=0.8, seed=7, eos_token_ids=[])
    c, _ = generate(rt, PROMPTS[1], tree, 30, temperature=0.8, seed=8, eos_token_ids=[])
    assert a == b and len(a) == 30 and a != c


def test_accept_picks_the_longest_agreeing_path():
    tree = build_tree([(0,), (1,), (0, 0), (1, 0)], topk=2, num_heads=2)
    tokens = np.array([5, 6, 7, 8, 9])  # root, (0,), (1,), (0,0), (1,0)
    logits = torch.full((5, 12), -1.0)
    for node, nxt in {0: 7, 2: 9, 4: 3, 1: 0, 3: 0}.items():
        logits[node, nxt] = 1.0  # base argmax after each node
    row, L, root = accept(tokens, logits, tree, 0.0, None)
    assert tree.retrieve_indices[row].tolist() == [0, 2, 4] and L == 2 and root == 3


def test_int8_heads_change_proposals_not_outputs(tiny_llama, tmp_path):
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3))
    info = export_medusa(tiny_llama, heads, tmp_path, topk=4, int8_heads=True)
    assert info["int8_heads"]
    rt8 = load_runtime(tmp_path, capacity=256, max_nodes=16)
    tree = build_tree(TREE, topk=4, num_heads=3)
    for prompt in PROMPTS:
        assert generate(rt8, prompt, tree, 30, eos_token_ids=[])[0] == hf_greedy(tiny_llama, prompt, 30)

