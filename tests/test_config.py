"""WorkbookConfig checks every field's type and range, and names the field (one validation)."""

import dataclasses
import math

import pytest

from medusa_lib.config import FIELD_NAMES, PRESETS, WorkbookConfig, _check_field, get_config

BAD = [  # (override, what the message must say): each was accepted, or failed later inside a library, before
    ({"train_records": -5}, "train_records must be at least 0, not -5"),
    ({"max_length": -1}, "max_length must be at least 2, not -1"),
    ({"eval_fraction": 1.5}, "eval_fraction must be 0 <= x < 1, not 1.5"),
    ({"lr": math.nan}, "lr must be a finite number"),
    ({"train_steps": math.inf}, "train_steps must be a whole number, not inf"),
    ({"warmup_steps": -10}, "warmup_steps must be at least 0, not -10"),
    ({"tree_nodes": -3}, "tree_nodes must be at least 1, not -3"),
    ({"eval_positions": 0}, "eval_positions must be at least 1, not 0"),
    ({"distill_batch_size": 0}, "distill_batch_size must be at least 1, not 0"),
    ({"max_records": -1}, "max_records must be at least 0, not -1"),
    ({"num_heads": "20"}, "num_heads must be a whole number, not '20' (str)"),
    ({"num_heads": None}, "num_heads must be a whole number, not None"),
    ({"num_heads": 2.0}, "num_heads must be a whole number, not 2.0 (float)"),
    ({"num_heads": True}, "num_heads must be a whole number, not True"),
    ({"cost_curve_sizes": "1,4"}, "cost_curve_sizes must be a non-empty list"),
    ({"cost_curve_sizes": ()}, "cost_curve_sizes must be a non-empty list"),
    ({"bench_methods": ()}, "bench_methods must be a non-empty list"),
    ({"bench_methods": ("ort", "fast")}, "bench_methods must be a non-empty list from"),
    ({"device": "gpu"}, "device must be 'auto', 'cpu' or 'cuda' (or 'cuda:N', a GPU by its index), not 'gpu'"),
    ({"int8_heads": 1}, "int8_heads must be true or false, not 1"),
    ({"loss_decay": 0}, "loss_decay must be 0 < x <= 1, not 0"),
    ({"base_graph": "quick"}, "base_graph must be 'auto', 'fast' or 'reference', not 'quick'"),
    ({"weights": "q2"}, "weights must be 'fp32', 'int8' or 'q4', not 'q2'"),
    ({"bench_methods": ("ort_ref@q4",)}, "bench_methods must be a non-empty list"),
    ({"bench_methods": ("hydra_pld@fp16",)}, "bench_methods must be a non-empty list"),
    ({"data_file": ""}, "data_file must be a path or null"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_a_bad_value_is_refused_naming_the_field(override, message):
    with pytest.raises(ValueError, match="Workbook config 'tiny': " + message.replace("(", r"\(").replace(")", r"\)")):
        get_config("tiny", **override)


def test_bad_values_from_the_environment_are_refused_too(monkeypatch):
    monkeypatch.setenv("WORKBOOK_OVERRIDES", '{"num_heads": "3"}')
    with pytest.raises(ValueError, match="num_heads must be a whole number, not '3'"):
        get_config("tiny")
    monkeypatch.setenv("WORKBOOK_OVERRIDES", '{"cost_curve_sizes": [1, 2.5]}')
    with pytest.raises(ValueError, match="cost_curve_sizes must be a non-empty list of whole numbers"):
        get_config("tiny")


def test_every_field_is_checked_and_every_preset_passes():
    for name in FIELD_NAMES:  # a field added without a check is caught here
        assert "has no check" not in " ".join(_check_field(name, getattr(PRESETS["full"], name))), name
    for preset in PRESETS:
        assert isinstance(get_config(preset), WorkbookConfig)
    assert get_config("tiny", device="cuda:1", lr=0.5, eval_fraction=0.0).device == "cuda:1"
    assert [f.name for f in dataclasses.fields(WorkbookConfig)] == list(FIELD_NAMES)


def test_setup_prints_the_machine_and_the_named_settings_only(capsys):
    from medusa_lib.config import setup

    cfg = setup("tiny", "num_heads", "topk")
    out = capsys.readouterr().out.splitlines()
    assert cfg.name == "tiny" and "onnxruntime" in out[0] and "cores" in out[0]
    assert out[1] == f"preset 'tiny': num_heads={cfg.num_heads!r}, topk={cfg.topk!r}"
    with pytest.raises(ValueError, match="heads_count"):
        setup("tiny", "heads_count")
