"""The embedded SmolLM2-135M base: GGUF conversion, clear errors, lossless Medusa on ORT (slow)."""

import importlib.util

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from medusa_lib import base
from medusa_lib.decoding import generate, load_runtime, parity_report
from medusa_lib.export import export_medusa
from medusa_lib.heads import HeadsConfig, MedusaHeads
from medusa_lib.tree import build_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return base.load_base("embedded", "cpu", "float32")


def test_converted_checkpoint_equals_the_gguf(smol):
    model, tokenizer = smol
    gguf = base.embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, direct(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # same de-quantised fp32 weights


def test_missing_inputs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does/not/exist.*local folder or a Hugging Face model id"):
        base.load_base("./does/not/exist")
    with pytest.raises(FileNotFoundError, match="nothing.gguf does not exist"):
        base.convert_gguf(tmp_path / "nothing.gguf", tmp_path / "out")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="model.gguf needs the `gguf` package: run `pip install gguf`"):
        base.convert_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_medusa_on_ort_is_lossless_on_the_embedded_model(smol, tmp_path):
    model, tokenizer = smol
    heads = MedusaHeads(HeadsConfig.for_base(model, num_heads=3))  # fresh heads: guess t+1 for t+2
    export_medusa(model, heads, tmp_path, topk=5)
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], topk=5, num_heads=3)
    rt = load_runtime(tmp_path, capacity=512, max_nodes=tree.size)
    assert rt.graph == "fast"  # the default graph; its tree step is checked against TreeStep by parity_report below
    for question in ["List three fruits.", "What is the boiling point of water?"]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
        plain, _ = generate(rt, ids, None, 48)
        medusa, stats = generate(rt, ids, tree, 48)
        assert medusa == plain == ref
    rows = parity_report(model, rt, ids, np.array(medusa[: tree.size]), tree)
    assert all(r["max_abs_diff"] <= 1e-3 for r in rows), rows


def test_bad_model_sources_get_one_clear_message(tmp_path, monkeypatch):
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(FileNotFoundError, match="weights_only has no config.json"):
        base.load_base(str(tmp_path / "weights_only"), "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"'HuggingFaceTB/SmolLM2-135M-Instrukt' is neither a local folder nor in the "
                                      r"Hugging Face cache \(offline"):
        base.load_base("HuggingFaceTB/SmolLM2-135M-Instrukt", "cpu")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base.embedded_gguf_path().read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match="cut.gguf cannot be read as a GGUF model .*damaged or truncated"):
        base.convert_gguf(cut, tmp_path / "out")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' but PyTorch sees no CUDA GPU"):
            base.resolve_device("cuda")
