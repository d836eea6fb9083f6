"""ONNX export parity and the ORT Medusa loop on a tiny random Llama: lossless greedy decoding,
EOS and KV-capacity handling, reproducible typical acceptance."""

import numpy as np
import pytest
import torch

from medusa_lib.config import get_config
from medusa_lib.decoding import accept, generate, load_runtime, parity_report, propose
from medusa_lib.export import export_medusa
from medusa_lib.heads import HeadsConfig, MedusaHeads
from medusa_lib.tree import build_tree, chain_paths

from conftest import perturbed

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


@pytest.fixture(params=["fast", "reference"])
def rt(exported, request):
    """Both base graphs (fast_graph.py and export.TreeStep) run every test that takes `rt`."""
    return load_runtime(exported, capacity=256, max_nodes=16, graph=request.param)


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


def test_a_cuda_provider_that_cannot_start_falls_back_to_the_cpu_and_says_so(exported, monkeypatch):
    # ORT itself only warns and runs on the CPU when its CUDA provider cannot load; the runtime must then
    # keep its buffers on the CPU too (CUDA pointers bound to a CPU session would be garbage), or refuse.
    import medusa_lib.decoding as decoding
    monkeypatch.setattr(decoding, "execution_providers", lambda provider="auto": ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="could not start its CUDA provider"):
        rt = decoding.load_runtime(exported, capacity=64, max_nodes=16)
    assert rt.device.type == "cpu" and rt.cache.device.type == "cpu" and rt.base.get_providers()[0] == "CPUExecutionProvider"
    tokens, _ = generate(rt, PROMPTS[0], build_tree(TREE, 4, 3), max_new_tokens=6)
    assert len(tokens) == 6
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        decoding.load_runtime(exported, capacity=64, max_nodes=8, provider="cuda")


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



# ----------------------------------------------------------------------------------------------
# Heads that see tokens: proposals depth by depth, still lossless

@pytest.fixture(scope="module", params=["root", "path"])
def token_export(request, tiny_llama, tmp_path_factory):
    torch.manual_seed(4)
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3, token_inputs=request.param, block_expansion=2,
                                             head_vocab=60), vocab_ids=torch.randperm(97)[:60].sort().values)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    export_medusa(tiny_llama, heads, out, topk=4)
    return heads.eval(), out


def test_token_heads_propose_what_pytorch_ranks_and_stay_lossless(tiny_llama, token_export):
    heads, folder = token_export
    rt = load_runtime(folder, capacity=256, max_nodes=16)
    tree = build_tree(TREE, topk=4, num_heads=3)
    lm_head, embed = tiny_llama.lm_head.weight, tiny_llama.model.embed_tokens.weight
    hidden, root = torch.randn(64), 11
    tokens = propose(rt, root, hidden, tree)
    for j, path in enumerate(tree.paths, start=1):  # node j: rank path[-1] of head len(path)-1 given its parents
        k = len(path) - 1
        seen = tokens[tree.ancestors[j, : k + 1]]  # root .. parent
        embeds = embed[torch.from_numpy(np.pad(seen, (0, 3 - len(seen))))][None]  # (1, 3, C)
        logits = heads(hidden[None], lm_head, embeds)[0, k]  # (60,)
        ranked = heads.token_ids(logits.topk(4).indices)
        assert tokens[j] == ranked[path[-1]], (path, tokens[j], ranked)
    for prompt in PROMPTS:
        assert generate(rt, prompt, tree, 30, eos_token_ids=[])[0] == hf_greedy(tiny_llama, prompt, 30)


def test_one_heads_call_drafts_what_the_per_depth_graphs_draft(token_export):
    """tree_heads.py: the sequential heads of a whole tree wired into one graph give every node the
    token and probability that the per-depth graphs give, called depth by depth on the same parents
    (the same kernels on the same rows; float rounding aside), and hold the shared output layer once."""
    import onnx
    from onnx import numpy_helper

    from medusa_lib.decoding import draft
    from medusa_lib.tree import DraftRule
    from medusa_lib.tree_heads import tree_heads_graph
    heads, folder = token_export
    if heads.config.token_inputs != "path":
        pytest.skip("one graph per depth exists for sequential heads only")
    rt = load_runtime(folder, capacity=64, max_nodes=16)
    tree = build_tree(TREE, topk=4, num_heads=3)
    rng = np.random.default_rng(3)
    for _ in range(5):
        hidden, root = torch.from_numpy(rng.standard_normal(64).astype(np.float32)), int(rng.integers(0, 97))
        _, tokens, probs = draft(rt, root, hidden, tree, DraftRule(len(TREE)))  # one call
        want, want_p = np.full(tree.size, -1), np.full(tree.size, np.nan)
        want[0], want_p[0] = root, 1.0
        for d, level in enumerate(tree.levels):  # depth by depth, each depth's graph on all its parents
            path = want[tree.ancestors[level.parents, : d + 1]]  # (B, d+1)
            ids, p = rt.heads[d].run(None, {"hidden_states": np.repeat(hidden.numpy()[None], len(path), axis=0),
                                            "token_embeddings": np.asarray(rt.embed[path.reshape(-1)]).reshape(*path.shape, -1)})
            want[level.children], want_p[level.children] = ids[level.slot, level.rank], p[level.slot, level.rank]
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_allclose(probs, want_p, rtol=0, atol=1e-6)
    from medusa_lib.decoding import TREE_HEADS_KEPT, tree_heads
    chains = [build_tree([(r,), (r, 0)], topk=4, num_heads=3) for r in range(4)] + \
        [build_tree([(r,), (r, 1), (r, 1, 0)], topk=4, num_heads=3) for r in range(4)] + [build_tree([(2,)], 4, 3)]
    for t in chains:  # more trees than a runtime keeps graphs for: the oldest go, the latest stay right
        np.testing.assert_array_equal(tree_heads(rt, t)(5, hidden.numpy()[None])[0], draft(rt, 5, hidden, t, DraftRule(3))[1])
    assert len(rt.tree_heads) == TREE_HEADS_KEPT and chains[-1].paths in rt.tree_heads and chains[0].paths not in rt.tree_heads
    graph = tree_heads_graph([folder / f"heads_{k}.onnx" for k in range(3)], tree).graph
    contents = [numpy_helper.to_array(init).tobytes() for init in graph.initializer if np.prod(init.dims) > 100]
    assert len(contents) == len(set(contents))  # each weight once, the output layer the heads share included
    per_head = sum(sum(np.prod(i.dims) > 100 for i in onnx.load(str(folder / f"heads_{k}.onnx")).graph.initializer)
                   for k in range(3))
    assert len(contents) < per_head


def test_draft_rules_change_the_passes_not_the_output(tiny_llama, rt, token_export):
    """Drafting only the surest nodes of a tree (tree.DraftRule) each step: every rule, with and
    without a prompt-lookup chain, gives plain greedy's tokens; the passes differ in size."""
    from medusa_lib.tree import DraftRule
    tree = build_tree(TREE, topk=4, num_heads=3)
    token_rt = load_runtime(token_export[1], capacity=256, max_nodes=16)
    rules = [DraftRule(0), DraftRule(1), DraftRule(3, 0.05), DraftRule(8), DraftRule(4, 1.0)]
    for runtime in (rt, token_rt):
        for prompt in PROMPTS:
            ref = hf_greedy(tiny_llama, prompt, 30)
            for rule in rules:
                out, stats = generate(runtime, prompt, tree, 30, eos_token_ids=[], rule=rule)
                assert out == ref, rule
                if rule.budget == 0 or rule.min_prob == 1.0:  # nothing drafted: one token a pass
                    assert stats.steps == 30
                out, _ = generate(runtime, prompt, tree, 30, eos_token_ids=[], rule=rule, lookup=3,
                                  lookup_rule=DraftRule(1))
                assert out == ref, rule
            everything, all_stats = generate(runtime, prompt, tree, 30, eos_token_ids=[], rule=DraftRule(len(TREE)))
            static, static_stats = generate(runtime, prompt, tree, 30, eos_token_ids=[])
            assert everything == static == ref and all_stats.accept_lens == static_stats.accept_lens  # the whole menu: the tree


def test_trees_that_do_not_fit_the_heads_are_refused(exported, rt):
    with pytest.raises(ValueError, match="built for topk=5 but the heads were exported with topk=4"):
        generate(rt, PROMPTS[0], build_tree([(0,), (0, 0)], topk=5, num_heads=3), 5)
    with pytest.raises(ValueError, match="4 deep but the export has 3 heads"):
        generate(rt, PROMPTS[0], build_tree(chain_paths(4), topk=4, num_heads=4), 5)
    plain_rt = load_runtime(exported, capacity=256, max_nodes=16, with_heads=False)
    with pytest.raises(ValueError, match="no heads"):
        generate(plain_rt, PROMPTS[0], build_tree(TREE, topk=4, num_heads=3), 5)


def test_an_export_without_its_heads_graph_says_so(tiny_llama, tmp_path):
    export_medusa(tiny_llama, MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2)), tmp_path, topk=4)
    (tmp_path / "heads.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="heads.onnx is missing"):
        load_runtime(tmp_path, capacity=64)
    (tmp_path / "base.onnx").write_bytes((tmp_path / "base.onnx").read_bytes()[:1000])
    with pytest.raises(ValueError, match="base.onnx cannot be loaded .*damaged or truncated"):
        load_runtime(tmp_path, capacity=64, with_heads=False, graph="reference")
    (tmp_path / "base_fast.onnx").write_bytes((tmp_path / "base_fast.onnx").read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="cannot load .*base_fast.onnx"):
        load_runtime(tmp_path, capacity=64, with_heads=False, graph="fast")


def test_an_interrupted_reexport_leaves_the_old_export_whole(tiny_llama, tmp_path, monkeypatch):
    from medusa_lib import export as export_module
    export_medusa(tiny_llama, MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2)), tmp_path / "onnx", topk=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()}

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(export_module, "export_heads", crash)
    with pytest.raises(KeyboardInterrupt):
        export_medusa(tiny_llama, MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3)), tmp_path / "onnx", topk=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()} == before


def test_bad_requests_get_clear_errors_and_zero_tokens_means_none(exported, rt):
    assert generate(rt, PROMPTS[0], None, 0) == ([], generate(rt, PROMPTS[0], None, 0)[1])
    assert generate(rt, PROMPTS[0], None, 0)[1].steps == 0
    for kwargs, message in [(dict(max_new_tokens=-1), "max_new_tokens must be a whole number >= 0"),
                            (dict(temperature=-0.5), "temperature must be >= 0"),
                            (dict(temperature=float("nan")), "temperature must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            generate(rt, PROMPTS[0], None, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(rt, [], None, 4)
    with pytest.raises(ValueError, match=r"Token id 97 in the prompt is outside the vocabulary \(0..96\)"):
        generate(rt, [1, 97], None, 4)
    with pytest.raises(ValueError, match="capacity >= 1"):
        load_runtime(exported, capacity=-5)
    with pytest.raises(ValueError, match="kv_capacity must be at least 1"):
        get_config("tiny", kv_capacity=-5)


def test_typical_acceptance_uses_upstreams_entropy():
    # a 32k vocabulary whose tail holds tiny probabilities: there -sum p log(p + 1e-5) (upstream) and
    # -sum p log p differ, and so do the thresholds min(0.09, 0.3 exp(-H)). A candidate whose
    # probability lies between the two thresholds is rejected, as upstream rejects it.
    V = 32000

    def dist(share):
        q = np.full(V, (0.4 - share) / (V - 2)); q[0], q[1] = 0.6, share
        return q

    def threshold(q, eps):
        return min(0.09, 0.3 * np.exp(np.sum(q * np.log(q + eps))))

    share = next(s for s in np.linspace(1e-4, 0.05, 2000) if threshold(dist(s), 0.0) * 1.05 < s < threshold(dist(s), 1e-5) / 1.05)
    tree = build_tree([(0,)], topk=1, num_heads=1)
    for candidate_share, accepted in ((share, 0), (threshold(dist(share), 1e-5) * 1.2, 1)):
        q = dist(candidate_share)
        logits = torch.from_numpy(np.log(np.stack([q, q]))).float()  # (2, V): the root and node 1
        _, L, _ = accept(np.array([0, 1]), logits, tree, 1.0, np.random.default_rng(0))
        assert L == accepted, (candidate_share, threshold(q, 0.0), threshold(q, 1e-5))


def test_export_info_with_a_missing_key_is_named(exported, tmp_path):
    import json
    import shutil
    copy = tmp_path / "onnx"
    shutil.copytree(exported, copy)
    info = json.loads((copy / "export_info.json").read_text())
    del info["kv_heads"]
    (copy / "export_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"export_info.json lacks \['kv_heads'\].*re-export"):
        load_runtime(copy, capacity=64)


def test_prompt_lookup_chain_is_lossless_and_accepts_copied_text(tiny_llama, rt, exported):
    from medusa_lib.tree import DraftRule, prompt_lookup
    prompt = [90, 1, 90, 1, 90, 1, 90, 1]  # a text that repeats itself
    ref = hf_greedy(tiny_llama, prompt, 30)
    tree = build_tree(TREE, topk=4, num_heads=3)
    for t, lookup in ((tree, 4), (build_tree([], topk=4, num_heads=3), 3)):  # with the heads, and prompt lookup alone
        out, stats = generate(rt, prompt, t, 30, eos_token_ids=[], lookup=lookup)
        assert out == ref
    no_heads = load_runtime(exported, capacity=256, max_nodes=16, with_heads=False)  # lookup alone needs no heads, rule or not
    out, stats = generate(no_heads, prompt, build_tree([], topk=4, num_heads=3), 30, eos_token_ids=[], lookup=3, rule=DraftRule(2))
    assert out == ref and stats.steps < 30
    assert prompt_lookup(np.array([5, 6, 7, 8, 6, 7]), 3).tolist() == [8, 6, 7]  # after the earlier "6 7"
    assert prompt_lookup(np.array([5, 6, 7, 8, 9, 1, 6, 7]), 3).tolist() == [8, 9, 1]
    assert prompt_lookup(np.array([1, 2, 3]), 2) is None


# ----------------------------------------------------------------------------------------------
# Half precision (the CUDA provider's graphs), checked with ORT's CPU provider

FP16_LOGITS_ATOL = 5e-3  # fp16 graph vs the fp32 PyTorch model; logits here are O(1) and differ by ~4e-4 (measured)


@pytest.fixture(scope="module")
def fp16_export(tiny_llama, tmp_path_factory):
    torch.manual_seed(3)
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("onnx_fp16")
    info = export_medusa(tiny_llama, heads, out, topk=4, fp16=True, int8_heads=True)
    return info, out


def test_fp16_export_matches_pytorch_within_tolerance(tiny_llama, fp16_export):
    info, folder = fp16_export
    assert info["dtype"] == "float16" and not info["int8_heads"]  # int8 is a CPU-kernel choice, skipped for fp16
    assert next(tiny_llama.parameters()).dtype == torch.float32  # the caller's model is not converted
    rt = load_runtime(folder, capacity=256, max_nodes=16)
    assert rt.cache.dtype == torch.float16 and rt.logits_buf.dtype == torch.float16
    tree = build_tree(TREE, topk=4, num_heads=3)
    rng = np.random.default_rng(0)
    for prompt in PROMPTS[:2]:
        for row in parity_report(tiny_llama, rt, prompt, rng.integers(0, 97, tree.size), tree):
            assert row["max_abs_diff"] <= FP16_LOGITS_ATOL, row


def test_fp16_greedy_medusa_equals_plain_greedy_on_the_same_graph(fp16_export):
    _, folder = fp16_export
    rt = load_runtime(folder, capacity=256, max_nodes=16)
    tree = build_tree(TREE, topk=4, num_heads=3)
    accepted = 0
    for prompt in PROMPTS:
        plain, _ = generate(rt, prompt, None, 40, eos_token_ids=[])
        medusa, stats = generate(rt, prompt, tree, 40, eos_token_ids=[])
        assert medusa == plain and len(plain) == 40
        accepted += sum(stats.accept_lens)
    assert accepted > 0


def test_graphs_are_fp32_unless_fp16_is_asked_for_even_on_the_gpu_preset():
    # fp16 graphs on the CUDA provider left plain decoding's output at near-ties (static/gpu/results_fp16.json),
    # so the lossless fp32 is every preset's choice and fp16 an explicit one
    from medusa_lib.export import export_fp16
    gpu = get_config("gpu")
    assert not export_fp16(gpu) and not gpu.int8_heads and gpu.kv_capacity >= gpu.max_new_tokens
    assert not export_fp16(get_config("full")) and export_fp16(get_config("gpu", export_dtype="float16"))
    with pytest.raises(ValueError, match="export_dtype must be 'float32' or 'float16', not 'auto'"):
        get_config("gpu", export_dtype="auto")


def test_overrides_from_the_environment_shrink_a_preset_and_bad_ones_are_named(monkeypatch):
    monkeypatch.setenv("WORKBOOK_OVERRIDES", '{"train_steps": 7, "cost_curve_sizes": [1, 4]}')
    cfg = get_config("gpu", num_heads=2)
    assert (cfg.train_steps, cfg.cost_curve_sizes, cfg.num_heads, cfg.tree_nodes) == (7, (1, 4), 2, 64)
    monkeypatch.setenv("WORKBOOK_OVERRIDES", '{"train_stepz": 7}')
    with pytest.raises(ValueError, match=r"names unknown settings \['train_stepz'\]"):
        get_config("gpu")
    monkeypatch.setenv("WORKBOOK_OVERRIDES", "train_steps=7")
    with pytest.raises(ValueError, match="must be a JSON object"):
        get_config("gpu")


# ----------------------------------------------------------------------------------------------
# Replay (notebook 06's sizing): the offline walk takes the decoder's steps

def test_replay_takes_the_steps_the_decoder_takes(rt):
    """replay.simulate walks the plain greedy reply with the confirmed nodes recorded once; the
    decoder runs each plan for real. Same text, so the same steps, up to a near-tie among the heads'
    ranks that the two forwards (prefill vs tree pass: different kernels) could order differently:
    allowed one step per plan, over all prompts."""
    from medusa_lib.replay import record, simulate
    big = build_tree(TREE, topk=4, num_heads=3)
    replays = record(rt, PROMPTS, big, 30, [], progress=False)
    assert [r.reply.tolist() for r in replays] == [generate(rt, p, None, 30, eos_token_ids=[])[0] for p in PROMPTS]
    plans = [(TREE, {}), ([(0,), (0, 0)], {}), ([(0,), (1,)], {"lookup": 3, "min_ngram": 1, "lookup_paths": [(0,)]}),
             ([], {"lookup": 4, "min_ngram": 2})]
    for paths, kw in plans:
        sim = simulate(replays, paths, {1: 1.0, 16: 2.0}, 0.0, per_depth=False, **kw)
        steps = 0
        for prompt, rep in zip(PROMPTS, replays):
            lookup = {"lookup": kw["lookup"], "lookup_min_ngram": kw["min_ngram"]} if kw else {}
            if kw.get("lookup_paths") is not None:
                lookup["lookup_tree"] = build_tree(kw["lookup_paths"], 4, 3)
            out, stats = generate(rt, prompt, build_tree(paths, 4, 3), 30, eos_token_ids=[], **lookup)
            assert out == rep.reply.tolist()
            steps += stats.steps
        assert abs(sim["steps"] - steps) <= 1, (paths, kw, sim["steps"], steps)
        assert sim["tau"] == pytest.approx(4 * 30 / sim["steps"])
    # draft rules: the replay runs the decoder's grow_draft on the recorded probabilities
    from medusa_lib.replay import _Drafts
    from medusa_lib.tree import DraftRule
    from medusa_lib.tree import to_depth
    # the menu itself, and cut to smaller depths (choose_plan's shallower menus): the same recording serves
    for menu, rule, kw in ((big, DraftRule(2), {}), (big, DraftRule(4, 0.05), {}),
                           (big, DraftRule(3), {"lookup": 3, "lookup_rule": DraftRule(1)}),
                           (to_depth(big, 2), DraftRule(3), {}), (to_depth(big, 1), DraftRule(2), {"lookup": 3})):
        sim = simulate(replays, menu.paths, {1: 1.0, 16: 2.0}, 0.0, per_depth=False, rule=rule,
                       drafts=_Drafts(replays, menu), **kw)
        steps = 0
        for prompt, rep in zip(PROMPTS, replays):
            out, stats = generate(rt, prompt, menu, 30, eos_token_ids=[], rule=rule, **kw)
            assert out == rep.reply.tolist()
            steps += stats.steps
        assert abs(sim["steps"] - steps) <= 1, (menu.paths, rule, kw, sim["steps"], steps)
    assert min(simulate(replays, p, {1: 1.0}, 0.0, False, **{k: v for k, v in kw.items()})["steps"] for p, kw in plans) < 4 * 30


def test_damaged_token_embeddings_and_missing_head_graphs_say_re_export(token_export, tmp_path):
    import json
    import shutil
    heads, folder = token_export
    copy = tmp_path / "onnx"
    shutil.copytree(folder, copy)
    table = copy / "token_embeddings.npy"
    good = table.read_bytes()
    cases = [(lambda: table.unlink(), FileNotFoundError, "token_embeddings.npy is missing.*re-export"),
             (lambda: table.write_bytes(good[: len(good) // 2]), ValueError, "cannot be read .*damaged or truncated; re-export"),
             (lambda: np.save(table, np.zeros((10, 64), np.float32)), ValueError, r"shape \(10, 64\), not float \(97, 64\).*re-export"),
             (lambda: np.save(table, np.zeros((97, 32), np.float32)), ValueError, r"shape \(97, 32\)"),
             (lambda: np.save(table, np.zeros((97, 64), np.int32)), ValueError, "holds a int32 table")]
    for damage, error, message in cases:
        table.write_bytes(good)
        damage()
        with pytest.raises(error, match=message):
            load_runtime(copy, capacity=64, max_nodes=16)
    table.write_bytes(good)
    info = json.loads((copy / "export_info.json").read_text())
    if info["token_inputs"] == "path":
        info["files"]["heads"] = info["files"]["heads"][:-1]  # fewer graphs than heads: the last depth would be missing
        (copy / "export_info.json").write_text(json.dumps(info))
        with pytest.raises(ValueError, match=r"lists 2 heads graph\(s\) for 3 heads \(one per head expected\).*re-export"):
            load_runtime(copy, capacity=64, max_nodes=16)


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    from medusa_lib.files import folder_lock
    target = tmp_path / "heads"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="heads is a file, not a folder"):
        with folder_lock(target, "head training"):
            pass
    assert target.read_text() == "not a folder"


def test_an_export_made_from_a_checkpoint_is_made_again_when_the_heads_change(tiny_llama, tmp_path, monkeypatch):
    """resolve_export_dir (the command lines' --heads DIR) records the checkpoint's fingerprint in the
    export it makes; heads trained again since are exported again, never served from the old graphs."""
    import json

    from medusa_lib import base
    from medusa_lib.export import resolve_export_dir
    from medusa_lib.heads import save_heads
    monkeypatch.setattr(base, "load_base", lambda *a, **k: (tiny_llama, None))
    cfg = get_config("tiny", topk=4)
    ckpt = tmp_path / "hydra"
    save_heads(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2)), ckpt)
    folder = resolve_export_dir(cfg, ckpt)
    first = json.loads((folder / "export_info.json").read_text())
    assert first["heads_fingerprint"] and resolve_export_dir(cfg, ckpt) == folder
    stamp = (folder / "export_info.json").read_text()
    assert resolve_export_dir(cfg, ckpt) == folder and (folder / "export_info.json").read_text() == stamp  # reused as it is
    save_heads(perturbed(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2)), 0.1, 5), ckpt)  # trained again
    resolve_export_dir(cfg, ckpt)
    again = json.loads((folder / "export_info.json").read_text())
    assert again["heads_fingerprint"] != first["heads_fingerprint"]


def test_an_export_interrupted_between_its_renames_keeps_its_complete_copy(tiny_llama, tmp_path):
    import os
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2))
    export_medusa(tiny_llama, heads, tmp_path / "onnx", topk=4)
    os.replace(tmp_path / "onnx", tmp_path / "onnx.partial")  # the state after the first rename of the swap
    with pytest.raises(FileNotFoundError, match=r"onnx.partial holds a complete export .*interrupted between its two renames"):
        load_runtime(tmp_path / "onnx", capacity=64)
    assert (tmp_path / "onnx.partial" / "export_info.json").is_file()  # a read rewrites nothing

    from medusa_lib import export as export_module

    def crash(*a, **k):
        raise KeyboardInterrupt
    real = export_module.export_base
    export_module.export_base = crash
    try:
        with pytest.raises(KeyboardInterrupt):  # the next export puts the complete copy back before it starts
            export_medusa(tiny_llama, heads, tmp_path / "onnx", topk=4)
    finally:
        export_module.export_base = real
    assert load_runtime(tmp_path / "onnx", capacity=64).info["num_heads"] == 2
