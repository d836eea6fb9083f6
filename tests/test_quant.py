"""Quantised base graphs (quant.py): int8 channels, the GGUF's Q4_1 blocks on a 4-bit grid, their error
against the weights they stand for, their logits against PyTorch with the same weights, rows computed
alike in any pass, and greedy Medusa equal to plain greedy decoding on them."""

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from medusa_lib.decoding import generate, load_runtime, prefill, run_base
from medusa_lib.export import causal_bias, export_medusa
from medusa_lib.heads import HeadsConfig, MedusaHeads
from medusa_lib.quant import (BLOCK, GGUF_NAMES, NoQ4Blocks, QuantisedWeights, decode_q4_1, decode_q8_0, int8_blocks,
                              int8_channels, q4_from_q4_1, round_blocks, weight_error)
from medusa_lib.tree import DraftRule, build_tree

from conftest import perturbed

Q = gguf.GGMLQuantizationType
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)]
PROMPTS = [[5, 17, 33, 2, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [90, 1, 90, 1, 90, 1, 90, 1]]
LOGITS_RTOL = 0.02  # q4/int8 graph vs PyTorch carrying the graph's own weights: both kernels round the activations to
# int8 (q4 per block of 32, int8 per row), so the logits differ by that rounding alone (measured <= 0.34% of the logits'
# range here for q4)


def half_step(w: np.ndarray, bits: int) -> np.ndarray:
    """Half the grid step of each block of 32 on a `bits`-bit grid whose range holds 0: (N, K/32)."""
    b = w.reshape(len(w), -1, BLOCK)
    return (np.maximum(b.max(-1), 0) - np.minimum(b.min(-1), 0)) / (2 ** bits - 1) / 2


def llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows in llama.cpp's converter order (each head's rotary halves interleaved)."""
    return w.reshape(heads, 2, len(w) // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, projections=Q.Q4_1, table=Q.Q8_0):
    """A GGUF of `model`'s tensors as llama.cpp lays them out, and a copy of the model carrying the
    file's de-quantised weights (what loading the GGUF with transformers gives)."""
    model = copy.deepcopy(model)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")

    def put(name, w, qtype):
        w = np.ascontiguousarray(w, dtype=np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, w)
            return w
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        return gguf.quants.dequantize(data, qtype)

    with torch.no_grad():
        table_w = put("token_embd.weight", model.model.embed_tokens.weight.numpy(), table)
        model.model.embed_tokens.weight.copy_(torch.from_numpy(table_w))  # tied: the output head too
        for i, layer in enumerate(model.model.layers):
            for short, gname in GGUF_NAMES.items():
                module = getattr(layer.self_attn if short in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, short)
                w = module.weight.numpy()
                heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(short)
                stored = put(f"blk.{i}.{gname}.weight", llama_cpp_rows(w, heads) if heads else w, projections)
                if heads:  # back to the Hugging Face order, as transformers' GGUF loader does
                    stored = stored.reshape(heads, len(w) // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
                module.weight.copy_(torch.from_numpy(stored))
            put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight.numpy(), Q.F32)
            put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight.numpy(), Q.F32)
        put("output_norm.weight", model.model.norm.weight.numpy(), Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def gguf_base(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    return write_gguf(tiny_llama, path), path


@pytest.fixture(scope="module")
def exports(gguf_base, tmp_path_factory):
    """Medusa-1 and sequential heads exported with the fp32, int8 and q4 fast graphs."""
    model, path = gguf_base
    out = {}
    for kind, token_inputs in (("medusa1", "none"), ("sequential", "path")):
        heads = perturbed(MedusaHeads(HeadsConfig.for_base(model, num_heads=3, token_inputs=token_inputs)), 0.05, 3)
        folder = tmp_path_factory.mktemp(kind)
        info = export_medusa(model, heads, folder, topk=4, base_model=str(path))
        assert info["files"]["base_fast_q4"] and info["files"]["base_fast_int8"], info["quantised"]
        out[kind] = folder
    return out


def test_int8_blocks_are_within_half_a_step_of_the_weights():
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32) * 0.1
    w[3, :32] += 0.5  # a block that is all positive: the grid's range still holds 0
    blocks = int8_blocks(w)
    dw = np.abs(blocks.dequantize() - w).reshape(48, -1, BLOCK).max(-1)
    assert (dw <= half_step(w, 8) + 1e-7).all()
    assert weight_error(blocks, w)["relative_rms"] < 0.01


def test_int8_channels_are_within_half_a_step_of_the_weights():
    w = np.random.default_rng(0).standard_normal((48, 100)).astype(np.float32) * 0.1  # any K: no blocks
    w[3] *= 20  # a row 20x larger keeps its own scale
    w[5] = 0.0  # an all-zero row
    channels = int8_channels(w)
    assert channels.q.dtype == np.int8 and channels.scales.shape == (48,)
    dw = np.abs(channels.dequantize() - w).max(1)
    assert (dw <= np.abs(w).max(1) / 127 / 2 + 1e-7).all() and not channels.dequantize()[5].any()
    assert weight_error(channels, w)["relative_rms"] < 0.01


def test_gguf_blocks_decode_as_the_gguf_package_dequantises_them():
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.Q4_1)
    d, m, q = decode_q4_1(raw)
    assert np.array_equal((d[..., None] * q + m[..., None]).reshape(8, 64), gguf.quants.dequantize(raw, Q.Q4_1))
    raw8 = gguf.quants.quantize(w, Q.Q8_0)
    d8, q8 = decode_q8_0(raw8)
    assert np.array_equal((d8[..., None] * q8).reshape(8, 64), gguf.quants.dequantize(raw8, Q.Q8_0))


def test_q4_1_blocks_on_an_integer_zero_point_grid_stay_within_half_a_step():
    w = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32)
    w[:4] = np.abs(w[:4]) + 0.3  # blocks without a zero crossing: -m/d lies off the 4-bit grid
    raw = gguf.quants.quantize(w, Q.Q4_1)
    exact = gguf.quants.dequantize(raw, Q.Q4_1)
    blocks = q4_from_q4_1(*decode_q4_1(raw))
    dw = np.abs(blocks.dequantize() - exact).reshape(64, -1, BLOCK).max(-1)
    assert (dw <= half_step(exact, 4) + 1e-6).all()  # the bound of rounding the block afresh; often far better
    q, scale, zero = round_blocks(exact.reshape(64, -1, BLOCK), 4)  # never worse than that, block by block
    afresh = ((scale[..., None] * (q - zero[..., None]) - exact.reshape(64, -1, BLOCK)) ** 2).sum(-1)
    ours = ((blocks.dequantize() - exact).reshape(64, -1, BLOCK) ** 2).sum(-1)
    assert (ours <= afresh + 1e-9).all()


def test_the_q4_weights_are_the_files_within_half_a_step_and_the_table_exactly(gguf_base):
    model, path = gguf_base
    source = QuantisedWeights("q4", model, path)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.numpy()
            dw = np.abs(source.weight(name, w).dequantize() - w).reshape(len(w), -1, BLOCK).max(-1)
            assert (dw <= half_step(w, 4) + 1e-6).all(), name
    table = model.get_output_embeddings().weight.numpy()
    assert np.array_equal(source.weight("lm_head", table).dequantize(), table)  # Q8_0 held as 8-bit blocks, exactly
    report = source.report()
    assert report["tensors"] == 2 * 7 + 1 and 0 < report["max_relative_rms"] < 0.2


def graph_weights(model, weights: str, path):
    """A copy of `model` carrying the weights a quantised graph multiplies by."""
    twin = copy.deepcopy(model)
    source = QuantisedWeights(weights, model, path)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.numpy()
                blocks = source.weight(name, w)
                if blocks is not None:
                    module.weight.copy_(torch.from_numpy(blocks.dequantize()))
    return twin


@pytest.mark.parametrize("weights", ["int8", "q4"])
def test_quantised_logits_match_pytorch_carrying_the_same_weights(gguf_base, exports, weights):
    model, path = gguf_base
    twin = graph_weights(model, weights, path)
    rt = load_runtime(exports["medusa1"], capacity=128, max_nodes=16, weights=weights, with_heads=False)
    prompt = np.array(PROMPTS[1])
    from medusa_lib.decoding import prefill
    ort_logits = prefill(rt, prompt)[0].float()  # the last position
    hf = twin(torch.from_numpy(prompt)[None]).logits[0, -1]
    spread = float(hf.max() - hf.min())
    assert float((ort_logits - hf).abs().max()) <= LOGITS_RTOL * spread
    assert int(ort_logits.argmax()) == int(hf.argmax())


@pytest.mark.parametrize("weights", ["int8", "q4"])
@pytest.mark.parametrize("kind", ["medusa1", "sequential"])
def test_greedy_medusa_equals_plain_greedy_on_a_quantised_graph(exports, weights, kind):
    rt = load_runtime(exports[kind], capacity=256, max_nodes=32, weights=weights)
    assert rt.weights == weights and rt.graph == "fast"
    tree = build_tree(TREE, topk=4, num_heads=3)
    plans = [{}, {"lookup": 3}, {"rule": DraftRule(4)}, {"lookup": 3, "rule": DraftRule(4)}]
    accepted = 0
    for prompt in PROMPTS:
        plain, _ = generate(rt, prompt, None, 40)
        for plan in plans:
            medusa, stats = generate(rt, prompt, tree, 40, **plan)
            assert medusa == plain, (kind, weights, plan)
            assert max(stats.pass_sizes) <= 1 + 3  # chains: the heads' top chain, or the lookup chain alone
            accepted += sum(stats.accept_lens)
    assert accepted > 20  # drafts were accepted: the equality was put to the test


def test_a_base_without_q4_blocks_gets_the_int8_graph_and_says_so(tiny_llama, tmp_path):
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2))
    info = export_medusa(tiny_llama, heads, tmp_path, topk=4)  # a Hugging Face base: no GGUF
    assert "base_fast_q4" not in info["files"] and "not loaded from" in info["quantised"]["q4"]["skipped"]
    with pytest.warns(UserWarning, match="no q4 graph.*int8"):
        rt = load_runtime(tmp_path, capacity=64, max_nodes=8, weights="q4")
    assert rt.weights == "int8"
    with pytest.raises(ValueError, match="graph='reference' is the fp32 graph"):
        load_runtime(tmp_path, capacity=64, max_nodes=8, weights="int8", graph="reference")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_runtime(tmp_path, capacity=64, max_nodes=8, weights="int4")


def test_a_gguf_of_another_type_or_model_is_named_and_skipped(tiny_llama, tmp_path):
    path = tmp_path / "tiny.Q5_0.gguf"
    model = write_gguf(tiny_llama, path, projections=Q.Q5_0)
    with pytest.raises(NoQ4Blocks, match=r"Q5_0.*use weights='int8'"):
        QuantisedWeights("q4", model, path)
    heads = MedusaHeads(HeadsConfig.for_base(model, num_heads=2))
    with pytest.warns(UserWarning, match="No q4 graph"):
        info = export_medusa(model, heads, tmp_path / "onnx", topk=4, base_model=str(path))
    assert "Q5_0" in info["quantised"]["q4"]["skipped"] and info["files"]["base_fast_int8"]
    other = copy.deepcopy(model)  # the same shapes, other weights: the file is not this model's
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    q41 = tmp_path / "tiny.Q4_1.gguf"
    write_gguf(tiny_llama, q41)
    with pytest.raises(NoQ4Blocks, match="does not hold the weights"):
        QuantisedWeights("q4", other, q41).weight("model.layers.0.self_attn.q_proj",
                                                  other.model.layers[0].self_attn.q_proj.weight.numpy())


def test_a_base_whose_widths_do_not_split_into_blocks_still_gets_the_int8_graph(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                       num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                                       tie_word_embeddings=True)).eval()  # 48 inputs: not blocks of 32
    info = export_medusa(odd, None, tmp_path, topk=4)
    assert info["files"]["base_fast_int8"] and "base_fast_q4" not in info["files"]  # int8 has a scale per channel
    rt = load_runtime(tmp_path, capacity=32, max_nodes=4, weights="int8", with_heads=False)
    prompt = np.array([3, 14, 15, 9, 2])
    with torch.no_grad():
        hf = graph_weights(odd, "int8", None)(torch.from_numpy(prompt)[None]).logits[0, -1]
    assert float((prefill(rt, prompt)[0] - hf).abs().max()) <= LOGITS_RTOL * float(hf.max() - hf.min())


@pytest.mark.parametrize("weights", ["int8", "q4"])
def test_a_chain_pass_on_a_quantised_graph_computes_each_row_bit_for_bit_as_one_token_passes(exports, weights):
    """Both kernels round the activations to int8, so a last-bit difference would flip roundings and grow
    through the layers: each row must be rounded on its own (per block for q4; per row, with a guard
    row fixing the tensor's range, for int8's integer GEMM) for a chain verified at once to be plain
    decoding."""
    rt = load_runtime(exports["medusa1"], capacity=256, max_nodes=16, weights=weights, with_heads=False)
    prompt, chain = np.array(PROMPTS[1]), np.array([3, 14, 15, 92, 65, 35])
    n, T = len(prompt), len(chain)
    prefill(rt, prompt)
    logits, hidden = (x.clone() for x in run_base(rt, chain, np.arange(n, n + T), causal_bias(n, T), n))
    for i in range(T):  # the same tokens again, one pass each, over the rows just written
        one_logits, one_hidden = run_base(rt, chain[i:i + 1], np.array([n + i]), causal_bias(n + i, 1), n + i)
        assert torch.equal(one_logits[0], logits[i]) and torch.equal(one_hidden[0], hidden[i]), (weights, i)


def test_each_quantised_graph_names_every_initializer_once(exports):
    import onnx
    info = json.loads((exports["medusa1"] / "export_info.json").read_text())
    for weights in ("int8", "q4"):
        graph = onnx.load(str(exports["medusa1"] / info["files"][f"base_fast_{weights}"])).graph
        names = [t.name for t in graph.initializer]
        assert len(names) == len(set(names)), weights


def test_an_all_zero_row_stays_zero_on_the_int8_graph(tiny_llama, tmp_path):
    """A token whose embedding is zero (a padding row) gives all-zero rows to every projection; the
    int8 graph divides each row by its largest |x|, which must not turn them into NaN."""
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = 0.0
    export_medusa(model, None, tmp_path, topk=4)
    rt = load_runtime(tmp_path, capacity=64, max_nodes=8, weights="int8", with_heads=False)
    twin = graph_weights(model, "int8", None)
    for prompt in ([7], [5, 7, 9, 7]):
        ours = prefill(rt, np.array(prompt))[0]
        with torch.no_grad():
            hf = twin(torch.tensor([prompt])).logits[0, -1]
        assert torch.isfinite(ours).all(), prompt
        assert float((ours - hf).abs().max()) <= LOGITS_RTOL * max(float(hf.max() - hf.min()), 1e-6), prompt
