"""The `gpu` preset's code paths (its own data folder and figures, fp16 graphs when asked for) on this
CPU: every notebook runs with `get_config("gpu")` at tiny sizes, so that the GPU route cannot rot
unnoticed between GPU runs. What the preset is about stays as it is: name and the questions file; the
graphs are fp16 here, the option a GPU user may take (the preset itself exports fp32)."""

import dataclasses
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from medusa_lib.config import WorkbookConfig, get_config, repo_root

KEPT = ("name", "bench_questions")  # the gpu preset's own choices; every size comes from tiny
SMALLER = dict(train_steps=20, hydra_train_steps=20, eval_every=10, warmup_steps=4, bench_prompts=2,
               bench_max_new_tokens=12, cost_curve_sizes=(1, 4))


@pytest.mark.slow
def test_every_notebook_runs_with_the_gpu_preset_at_tiny_sizes(tmp_path, monkeypatch):
    tiny = get_config("tiny")
    overrides = {f.name: getattr(tiny, f.name) for f in dataclasses.fields(WorkbookConfig) if f.name not in KEPT}
    overrides.update(SMALLER, export_dtype="float16", figures_dir=str(tmp_path / "figures"))
    monkeypatch.setenv("WORKBOOK_PRESET", "gpu")
    monkeypatch.setenv("WORKBOOK_OVERRIDES", json.dumps(overrides))
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path / "data"))
    cfg = get_config()
    assert cfg.name == "gpu" and cfg.export_dtype == "float16" and cfg.train_steps == 20
    folder = repo_root() / "notebooks"
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    info = json.loads((tmp_path / "data" / "gpu" / "onnx" / "export_info.json").read_text())
    assert info["dtype"] == "float16"
    results = json.loads((tmp_path / "data" / "gpu" / "bench" / "results.json").read_text())
    assert all(m["identical_to_ort" if m["identical_to_plain"] is None else "identical_to_plain"] == m["prompts"]
               for name, m in results["methods"].items() if name != "llamacpp")  # lossless on the fp16 graph (llama.cpp,
    # when installed, runs its own arithmetic)
    text = (tmp_path / "data" / "gpu" / "bench" / "results.json").read_text()
    assert str(tmp_path) not in text and not any(p in text for p in ('"/tmp/', '"/root/', '"/home/', '"/work/'))  # paths inside the clone
    assert results["machine"]["cpu_model"] and isinstance(results["machine"]["cpu_flags"], list)
    assert results["machine"]["base_graph"] == "fast"  # fp16 export: its fast graph in fp16 (what CUDA's GQA runs)
    assert all(m["uses"]["export"].startswith("data/gpu/") for name, m in results["methods"].items()
               if m.get("uses") and name != "llamacpp")  # llama.cpp reads the GGUF file itself
    assert results["methods"]["ort_ref"]["uses"]["graph"] == "reference"  # what each method ran is recorded
    assert any(Path(tmp_path / "figures").glob("06_*.png"))  # figures went where the config said, not to static/
    # a prompt too long for the KV cache is skipped before any method runs, named; the other prompts are kept
    from medusa_lib.bench import run_benchmark
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": qid, "turns": [text]})
                                   for qid, text in (("short", "Hi!"), ("long", "word " * 2000))) + "\n")
    res = run_benchmark(cfg, questions=str(questions), limit=2, max_new_tokens=4, methods=["ort"], memory=False, progress=False)
    assert res["methods"]["ort"]["prompts"] == 1 and res["settings"]["prompts_skipped"] == 1
    assert any(n.startswith("question long skipped") and f"kv_capacity={cfg.kv_capacity}" in n for n in res["notes"])
