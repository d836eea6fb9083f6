"""The fast base graph (fast_graph.py): a dozen fused nodes a layer, the same logits as the reference
graph, the same greedy output with and without Medusa, and a fallback that says so."""

import copy
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusa_lib.decoding import generate, load_runtime, parity_report, prefill, run_base, verify
from medusa_lib.export import causal_bias, export_medusa, read_export_info
from medusa_lib.fast_graph import FAST_FILE, build_fast_graph, fast_graph_problem
from medusa_lib.heads import HeadsConfig, MedusaHeads
from medusa_lib.tree import DraftRule, build_tree

from conftest import perturbed

TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)]
PROMPTS = [[5, 17, 33, 2, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [7], [90, 1, 90, 1, 90, 1, 90, 1]]
LOGITS_ATOL = 1e-4  # fast vs reference graph, fp32, different kernels (fused RMSNorm, GQA): measured <= 4e-7 here
MAX_NODES_PER_LAYER = 15


def llama(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def optimized_nodes(proto: onnx.ModelProto, tmp_path, name: str) -> list[str]:
    """Op types of the graph as ONNX Runtime runs it (after its own optimizer), Constants left out."""
    src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}_opt.onnx"
    onnx.save(proto, str(src))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(dst)).graph.node if n.op_type != "Constant"]


def test_the_fast_graph_has_at_most_15_nodes_a_layer_and_no_cache_copies(tmp_path):
    two, four = (optimized_nodes(build_fast_graph(llama(n)), tmp_path, f"l{n}") for n in (2, 4))
    per_layer = (len(four) - len(two)) / 2  # what is outside the layers cancels
    assert per_layer <= MAX_NODES_PER_LAYER, (per_layer, four)
    assert four.count("GroupQueryAttention") == 4
    assert not {"Concat", "Expand", "Transpose", "Softmax"} & set(four)  # no cache copied, no attention spelled out


def test_fast_logits_match_the_reference_graph_and_pytorch(tiny_llama, tmp_path):
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3))
    info = export_medusa(tiny_llama, heads, tmp_path, topk=4)
    assert info["files"]["base_fast"] == FAST_FILE and info["fast_graph"] == "written"
    fast = load_runtime(tmp_path, capacity=128, max_nodes=16, graph="fast")
    ref = load_runtime(tmp_path, capacity=128, max_nodes=16, graph="reference")
    tree = build_tree(TREE, topk=4, num_heads=3)
    rng = np.random.default_rng(1)
    for prompt in PROMPTS:
        tokens = rng.integers(0, 97, tree.size)
        for row in parity_report(tiny_llama, fast, prompt, tokens, tree):  # against HF and TreeStep
            assert row["max_abs_diff"] <= LOGITS_ATOL, row
        a = verify(fast, tokens, tree, len(prompt))[0].clone()  # the cache holds the prompt from parity_report
        run_base(ref, np.asarray(prompt), np.arange(len(prompt)), causal_bias(0, len(prompt)), 0, into_buffers=False)
        b = verify(ref, tokens, tree, len(prompt))[0]
        assert float((a - b).abs().max()) <= LOGITS_ATOL
        n = len(prompt)  # the tree's new keys land in rows n..n+N, rotated for positions n + depth, in both layouts
        torch.testing.assert_close(fast.kv_rows(0, n, n + tree.size), ref.kv_rows(0, n, n + tree.size), atol=LOGITS_ATOL, rtol=0)


@pytest.fixture(scope="module")
def sequential_export(tiny_llama, tmp_path_factory):
    torch.manual_seed(4)
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3, token_inputs="path", block_expansion=2,
                                             head_vocab=60), vocab_ids=torch.randperm(97)[:60].sort().values)
    out = tmp_path_factory.mktemp("fast_seq")
    export_medusa(tiny_llama, perturbed(heads, 0.05, 4), out, topk=4)
    return out


@pytest.fixture(scope="module")
def medusa1_export(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast_m1")
    export_medusa(tiny_llama, perturbed(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3)), 0.02, 3), out, topk=4)
    return out


@pytest.mark.parametrize("kind", ["medusa1", "sequential"])
def test_greedy_medusa_equals_plain_greedy_on_the_fast_graph(tiny_llama, kind, medusa1_export, sequential_export):
    folder = medusa1_export if kind == "medusa1" else sequential_export
    rt = load_runtime(folder, capacity=256, max_nodes=16, graph="fast")
    tree = build_tree(TREE, topk=4, num_heads=3)
    accepted = 0
    for prompt in PROMPTS:
        plain, stats = generate(rt, prompt, None, 40, eos_token_ids=[])
        hf = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
        assert plain == hf[0, len(prompt):].tolist() and stats.steps == 40
        for kwargs in ({}, {"lookup": 3}, {"rule": DraftRule(3)}, {"lookup": 4, "rule": DraftRule(2), "lookup_rule": DraftRule(1)}):
            medusa, stats = generate(rt, prompt, tree, 40, eos_token_ids=[], **kwargs)
            assert medusa == plain, (kind, prompt, kwargs)
            accepted += sum(stats.accept_lens)
    assert accepted > 0  # acceptance and compaction in the head-major cache were exercised


def test_an_export_on_the_same_base_links_its_base_graphs_and_decodes_the_same(tiny_llama, tmp_path):
    """share_base_with: the sequential heads' export links the Medusa-1 export's base graphs (one copy
    on disk) and decodes exactly as that export's plain greedy, also after the first export is redone;
    a different base is exported afresh, never linked."""
    first, second = tmp_path / "m1", tmp_path / "seq"
    export_medusa(tiny_llama, perturbed(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3)), 0.02, 3), first, topk=4)
    seq = perturbed(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3, token_inputs="path", block_expansion=2)), 0.05, 4)
    info = export_medusa(tiny_llama, seq, second, topk=4, share_base_with=first)
    assert info["base_shared_with"] == "m1" and info["files"]["heads"] == ["heads_0.onnx", "heads_1.onnx", "heads_2.onnx"]
    base_files = [v for k, v in info["files"].items() if (k == "base" or k.startswith("base_fast")) and isinstance(v, str)]
    assert "base.onnx" in base_files and "base_fast.onnx" in base_files
    assert all(os.path.samefile(first / name, second / name) for name in base_files)
    tree = build_tree(TREE, topk=4, num_heads=3)
    plain = [generate(load_runtime(first, capacity=256, max_nodes=16), p, None, 30, eos_token_ids=[])[0] for p in PROMPTS[:2]]
    export_medusa(tiny_llama, perturbed(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3)), 0.02, 5), first, topk=4)
    rt = load_runtime(second, capacity=256, max_nodes=16)  # after the first export was redone
    for prompt, want in zip(PROMPTS[:2], plain):
        assert generate(rt, prompt, tree, 30, eos_token_ids=[])[0] == want
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    info = export_medusa(other, None, tmp_path / "other", topk=4, share_base_with=first)
    assert "base_shared_with" not in info
    assert not os.path.samefile(first / "base.onnx", tmp_path / "other" / "base.onnx")
    assert info["base_fingerprint"] != read_export_info(first)["base_fingerprint"]


def test_a_chain_pass_computes_each_row_bit_for_bit_as_one_token_passes(medusa1_export):
    """The attention's spare row (fast_graph.py): a token's logits, hidden state and cache rows do not
    depend on how many tokens share its pass, so a chain of drafts verified at once is plain decoding."""
    rt = load_runtime(medusa1_export, capacity=256, max_nodes=16, graph="fast")
    prompt, chain = np.array(PROMPTS[1]), np.array([3, 14, 15, 92, 65, 35])
    n, T = len(prompt), len(chain)
    prefill(rt, prompt)
    logits, hidden = (x.clone() for x in run_base(rt, chain, np.arange(n, n + T), causal_bias(n, T), n))
    rows = rt.token_rows()[:, n:n + T].clone()
    for i in range(T):  # the same tokens again, one pass each, over the rows just written
        one_logits, one_hidden = run_base(rt, chain[i:i + 1], np.array([n + i]), causal_bias(n + i, 1), n + i)
        assert torch.equal(one_logits[0], logits[i]) and torch.equal(one_hidden[0], hidden[i]), i
    assert torch.equal(rt.token_rows()[:, n:n + T], rows)


def test_the_fast_graph_serves_steps_from_bindings_made_once_per_width(medusa1_export):
    rt = load_runtime(medusa1_export, capacity=256, max_nodes=16, graph="fast")
    generate(rt, PROMPTS[1], build_tree(TREE, topk=4, num_heads=3), 30, eos_token_ids=[])
    generate(rt, PROMPTS[1], None, 30, eos_token_ids=[])
    assert set(rt.bindings) == {1, len(TREE) + 1}  # one binding per pass width, reused every step


def test_without_a_usable_fast_graph_the_runtime_says_so_and_uses_the_reference(medusa1_export, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(medusa1_export, old)
    info = json.loads((old / "export_info.json").read_text())
    del info["files"]["base_fast"]  # an export made before the fast graph existed
    (old / "export_info.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="Fast base graph not used: .* has no fast graph.*reference graph"):
        rt = load_runtime(old, capacity=64, max_nodes=16)
    assert rt.graph == "reference"
    with pytest.raises(RuntimeError, match="graph='fast' cannot run: .*has no fast graph"):
        load_runtime(old, capacity=64, max_nodes=16, graph="fast")
    with pytest.warns(UserWarning, match="capacity 600 exceeds the 512 positions"):
        assert load_runtime(medusa1_export, capacity=600, max_nodes=16).graph == "reference"
    (old / FAST_FILE).write_bytes(b"not a model")
    info["files"]["base_fast"] = FAST_FILE
    (old / "export_info.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="cannot load .*base_fast.onnx"):
        assert load_runtime(old, capacity=64, max_nodes=16).graph == "reference"
    with pytest.raises(ValueError, match="graph must be one of"):
        load_runtime(old, capacity=64, graph="fastest")


def test_bases_the_fast_graph_cannot_express_are_exported_without_it(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=512)).eval()
    assert "q/k norms" in fast_graph_problem(qwen3)
    info = export_medusa(qwen3, None, tmp_path, topk=4)
    assert info["files"]["base_fast"] is None and "q/k norms" in info["fast_graph"]
    with pytest.warns(UserWarning, match="q/k norms"):
        rt = load_runtime(tmp_path, capacity=64, max_nodes=4)
    assert rt.graph == "reference"
    with pytest.raises(NotImplementedError, match="No fast graph for this base"):
        build_fast_graph(qwen3)


FP16_LOGITS_ATOL = 5e-3  # fp16 graphs vs the fp32 PyTorch model, as for the fp16 reference graph (test_export_decoding)


def test_an_fp16_export_carries_an_fp16_fast_graph_that_decodes_losslessly(tiny_llama, tmp_path):
    """export_dtype float16 (the CUDA provider's GroupQueryAttention is fp16/bf16 only): the fast graph is
    written in fp16 beside the fp16 reference graph, matches PyTorch within fp16's tolerance, and Medusa's
    greedy output equals plain greedy output on it (ONNX Runtime's CPU provider runs it here)."""
    torch.manual_seed(5)
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3, token_inputs="path", block_expansion=2))
    info = export_medusa(tiny_llama, perturbed(heads, 0.05, 5), tmp_path, topk=4, fp16=True)
    assert info["files"]["base_fast"] == FAST_FILE and info["fast_graph"] == "written"
    assert all("fp16 export" in q["skipped"] for q in info["quantised"].values())  # quantised sets: fp32 exports only
    graph = onnx.load(str(tmp_path / FAST_FILE)).graph
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["attention_bias"] == onnx.TensorProto.FLOAT16
    rt = load_runtime(tmp_path, capacity=256, max_nodes=16)
    assert rt.graph == "fast" and rt.np_dtype == np.float16 and rt.cache.dtype == torch.float16
    tree = build_tree(TREE, topk=4, num_heads=3)
    rng = np.random.default_rng(2)
    for prompt in PROMPTS[:2]:
        for row in parity_report(tiny_llama, rt, prompt, rng.integers(0, 97, tree.size), tree):
            assert row["max_abs_diff"] <= FP16_LOGITS_ATOL, row
    accepted = 0
    for prompt in PROMPTS:
        plain, _ = generate(rt, prompt, None, 40, eos_token_ids=[])
        for kwargs in ({}, {"lookup": 3}, {"lookup": 4, "rule": DraftRule(2), "lookup_rule": DraftRule(1)}):
            medusa, stats = generate(rt, prompt, tree, 40, eos_token_ids=[], **kwargs)
            assert medusa == plain, (prompt, kwargs)
            accepted += sum(stats.accept_lens)
    assert accepted > 0


def test_a_fast_graph_that_loads_but_cannot_run_falls_back_saying_why(medusa1_export, monkeypatch):
    """A provider may load GroupQueryAttention and still reject an input at run time (ONNX Runtime's CUDA
    kernel and `attention_bias`, until mid-2026): the runtime tries one pass at load, says why, and
    decodes with the reference graph; graph='fast' is an error."""
    real_run = ort.InferenceSession.run

    def run(self, output_names, feed, *args, **kwargs):
        if "seqlens_k" in feed:  # the fast graph's inputs
            raise RuntimeError("attention_bias is not supported in GroupQueryAttention cuda kernel.")
        return real_run(self, output_names, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    with pytest.warns(UserWarning, match=r"cannot run .*base_fast.onnx on CPUExecutionProvider \(attention_bias is not"):
        rt = load_runtime(medusa1_export, capacity=64, max_nodes=16)
    assert rt.graph == "reference"
    plain, _ = generate(rt, PROMPTS[0], None, 8, eos_token_ids=[])
    assert len(plain) == 8
    with pytest.raises(RuntimeError, match="graph='fast' cannot run: ONNX Runtime"):
        load_runtime(medusa1_export, capacity=64, max_nodes=16, graph="fast")
