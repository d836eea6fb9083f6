"""Bad input found by a sweep of edited files and wrong arguments: each gets one clear error naming
the file or setting, where it used to run quietly wrong (a plan's misspelt key ignored, a lookup that
never fires, drafts from the wrong candidates, a prompt of floats truncated, an EOS id read as
characters) or to fail deep inside numpy, torch or ONNX Runtime."""

import json
import shutil

import numpy as np
import pytest
import torch

from medusa_lib.bench import load_questions, run_benchmark
from medusa_lib.config import get_config
from medusa_lib.decoding import generate, load_runtime
from medusa_lib.export import export_medusa, read_export_info
from medusa_lib.files import read_json
from medusa_lib.heads import HeadsConfig, MedusaHeads, load_heads, save_heads
from medusa_lib.tree import DraftRule, build_tree, load_plan, save_tree

from conftest import perturbed

PROMPT = [5, 17, 33, 2, 8]


@pytest.fixture(scope="module")
def exports(tiny_llama, tmp_path_factory):
    """A Medusa-1 export and a sequential-heads export of the tiny base (3 heads, topk 4)."""
    root = tmp_path_factory.mktemp("faults")
    export_medusa(tiny_llama, perturbed(MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3)), 0.02, 3),
                  root / "m1", topk=4)
    seq = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3, token_inputs="path", block_expansion=2))
    export_medusa(tiny_llama, perturbed(seq, 0.05, 4), root / "seq", topk=4)
    return root


def edited_copy(src, dst, **changes):
    """A copy of an export with export_info.json edited (the graphs stay the same files)."""
    shutil.copytree(src, dst)
    info = read_json(dst / "export_info.json")
    info.update(changes)
    (dst / "export_info.json").write_text(json.dumps(info))
    return dst


def plan(tmp_path, **sections):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"paths": [[0], [1], [0, 0]], "topk": 4, **sections}))
    return path


def test_plan_files_with_misspelt_keys_or_a_lookup_that_cannot_fire_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"plan.json: 'rule' has unknown key\(s\) \['min_porb'\]"):
        load_plan(plan(tmp_path, rule={"budget": 1, "min_porb": 0.9}), 3)
    with pytest.raises(ValueError, match=r"plan.json: the 'lookup' section has unknown key\(s\) \['min_ngrams'\]"):
        load_plan(plan(tmp_path, lookup={"tokens": 2, "min_ngrams": 2}), 3)
    with pytest.raises(ValueError, match=r"plan.json: the lookup's min_ngram must be 1..3"):
        load_plan(plan(tmp_path, lookup={"tokens": 3, "min_ngram": 5}), 3)
    with pytest.raises(ValueError, match=r"plan.json: the lookup's tokens must be a whole number in 0..64"):
        load_plan(plan(tmp_path, lookup={"tokens": 100000}), 3)
    with pytest.raises(ValueError, match=r"plan.json: the file has unknown key\(s\) \['rules'\]"):
        load_plan(plan(tmp_path, rules={"budget": 1}), 3)
    with pytest.raises(ValueError, match=r"save_tree: \['rules'\] are not fields of a tree file"):
        save_tree(tmp_path / "written.json", [(0,)], 4, rules={"budget": 1})
    tree, kwargs = load_plan(plan(tmp_path, rule={"budget": 2, "min_prob": 0.1}, lookup={"tokens": 3, "min_ngram": 2}), 3)
    assert kwargs == {"rule": DraftRule(2, 0.1), "lookup": 3, "lookup_min_ngram": 2} and tree.size == 4


def test_trees_and_rules_are_checked_where_they_are_made(tmp_path):
    with pytest.raises(ValueError, match="A tree is a list of rank paths"):
        build_tree(None, 4, 3)
    with pytest.raises(ValueError, match="DraftRule.min_prob must be a number"):
        DraftRule(1, "x")
    with pytest.raises(ValueError, match=r"needs its prefix \(0,\)"):
        save_tree(tmp_path / "tree.json", [(0, 1)], 4)
    assert not (tmp_path / "tree.json").exists()  # nothing written: the bad tree is refused before its next load
    with pytest.raises(ValueError, match="unknown settings \\['train_stepz'\\]"):
        get_config("tiny", train_stepz=3)
    with pytest.raises(ValueError, match="each named once"):
        get_config("tiny", bench_methods=("ort", "ort"))
    with pytest.raises(ValueError, match="device must be .* \\(or 'cuda:N', a GPU by its index\\), not 'cuda:x'"):
        get_config("tiny", device="cuda:x")
    assert get_config("tiny", device="cuda:1").device == "cuda:1"


def test_a_data_root_that_is_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path / "notes.txt"))
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"WORKBOOK_DATA=.*notes.txt is a file: point it at a folder"):
        get_config("tiny").data_dir


def test_an_edited_export_info_is_refused_naming_the_file(exports, tmp_path):
    bad = edited_copy(exports / "m1", tmp_path / "layers", num_layers="2")
    with pytest.raises(ValueError, match=r"layers/export_info.json holds values no export writes \(num_layers='2'\)"):
        read_export_info(bad)
    bad = edited_copy(exports / "m1", tmp_path / "eos", eos_token_ids="2")  # would read as {"2"}: never stops
    with pytest.raises(ValueError, match=r"eos_token_ids='2'"):
        load_runtime(bad, capacity=64)
    for field, value in (("num_layers", 3), ("kv_heads", 4), ("head_dim", 8), ("vocab_size", 96), ("hidden_size", 32),
                         ("dtype", "float16")):  # well-formed, but not what the graphs hold
        bad = edited_copy(exports / "m1", tmp_path / field, **{field: value})
        for graph in ("fast", "reference"):
            with pytest.raises(ValueError, match=rf"disagrees with the base graph it lists: {field}="):
                load_runtime(bad, capacity=64, graph=graph)
    bad = edited_copy(exports / "m1", tmp_path / "topk", topk=5)  # the tree would index the wrong candidates
    with pytest.raises(ValueError, match=r"says topk=5 but heads.onnx gives 4 candidates"):
        load_runtime(bad, capacity=64)


def test_heads_graphs_mixed_up_or_an_empty_embedding_table_are_refused(exports, tmp_path):
    swapped = shutil.copytree(exports / "seq", tmp_path / "swapped")
    (swapped / "heads_0.onnx").rename(swapped / "tmp.onnx")
    (swapped / "heads_1.onnx").rename(swapped / "heads_0.onnx")
    (swapped / "tmp.onnx").rename(swapped / "heads_1.onnx")
    with pytest.raises(ValueError, match=r"heads_0.onnx reads 2 token\(s\).*mixed up"):
        load_runtime(swapped, capacity=64)
    empty = shutil.copytree(exports / "seq", tmp_path / "empty")
    (empty / "token_embeddings.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"token_embeddings.npy cannot be read"):
        load_runtime(empty, capacity=64)


def test_generate_refuses_prompts_and_eos_ids_it_would_misread(exports):
    rt = load_runtime(exports / "m1", capacity=64, max_nodes=8)
    want, _ = generate(rt, PROMPT, None, 5, eos_token_ids=[])
    assert generate(rt, np.array([PROMPT]), None, 5, eos_token_ids=[])[0] == want  # a batch of one is one prompt
    for bad in ([5.7, 6.2], ["5", "6"], [PROMPT, PROMPT]):
        with pytest.raises(ValueError, match="prompt_ids must be one prompt of token ids"):
            generate(rt, bad, None, 5)
    for bad in ("17", 17, [1.5]):
        with pytest.raises(ValueError, match="eos_token_ids must be a list of token ids"):
            generate(rt, PROMPT, None, 5, eos_token_ids=bad)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number"):
        generate(rt, PROMPT, None, True)
    with pytest.raises(ValueError, match="min_ngram must be 1..3"):
        generate(rt, PROMPT, build_tree([], 4, 3), 5, lookup=3, lookup_min_ngram=4)
    with pytest.raises(ValueError, match="the kv_capacity setting"):
        generate(rt, list(range(70)), None, 5)
    with pytest.raises(ValueError, match=r"threads setting or --threads"):
        load_runtime(exports / "m1", capacity=64, threads=-1)


def test_bench_inputs_refused_before_any_work(tmp_path):
    latin = tmp_path / "questions.jsonl"
    latin.write_bytes('{"turns": ["caf\xe9"]}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"questions.jsonl is not UTF-8 text \(byte 15"):
        load_questions(latin, get_config("tiny"), 5)
    with pytest.raises(ValueError, match="name ort more than once"):
        run_benchmark(get_config("tiny"), methods=["ort", " ort"])
    with pytest.raises(IsADirectoryError, match="is a folder: give the JSON file inside it"):
        read_json(tmp_path)


def test_heads_with_non_finite_weights_are_refused(tiny_llama, tmp_path):
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=2))
    with torch.no_grad():
        next(heads.parameters()).view(-1)[0] = float("inf")
    save_heads(heads, tmp_path / "heads")
    with pytest.raises(ValueError, match=r"heads.safetensors holds non-finite weights"):
        load_heads(tmp_path / "heads", tiny_llama)


def test_sequential_heads_exported_again_after_loading_are_refused_not_mixed(exports, tmp_path):
    """The heads' one-call graph (tree_heads.py) is made from the export's files at its first use; if the
    folder was exported again in between, decoding stops with one message instead of drafting with
    heads other than those the runtime checked (and without touching the files)."""
    folder = edited_copy(exports / "seq", tmp_path / "seq")
    rt = load_runtime(folder, capacity=64, max_nodes=16)
    info = read_json(folder / "export_info.json")
    (folder / "export_info.json").write_text(json.dumps({**info, "heads_fingerprint": "0123456789abcdef"}))
    before = (folder / "heads_0.onnx").read_bytes()
    with pytest.raises(RuntimeError, match=r"seq holds other heads than when this runtime was loaded .*load the runtime again"):
        generate(rt, PROMPT, build_tree([(0,), (0, 0)], 4, 3), 5)
    assert (folder / "heads_0.onnx").read_bytes() == before
    (folder / "export_info.json").write_text(json.dumps(info))
    (folder / "heads_1.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"heads_1.onnx is missing since this runtime was loaded: re-export"):
        generate(rt, PROMPT, build_tree([(0,), (0, 0)], 4, 3), 5)
    fresh = load_runtime(exports / "seq", capacity=64, max_nodes=16)  # the untouched export decodes
    assert len(generate(fresh, PROMPT, build_tree([(0,), (0, 0)], 4, 3), 5, eos_token_ids=[])[0]) == 5
