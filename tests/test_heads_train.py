"""Heads and training: identity at init, distinct blocks, label shift, learning, checkpoints, resume."""

import json

import pytest
import torch

from medusa_lib.config import get_config, hydra_config
from medusa_lib.heads import (HeadsConfig, MedusaHeads, export_medusa_layout, import_medusa_layout, load_heads,
                              save_heads)
from medusa_lib.train import (IGNORE, TEACHER_TOPK, RunFolderTaken, Targets, build_hidden_cache, evaluate_heads,
                              frequent_vocab, head_targets, load_hidden_cache, run_dir, train_heads, training_time)

C, V = 16, 50


def test_fresh_shared_heads_reproduce_the_base_logits(tiny_llama):
    heads = MedusaHeads(HeadsConfig.for_base(tiny_llama, num_heads=3, num_layers=2))
    h = torch.randn(5, tiny_llama.config.hidden_size)
    W = tiny_llama.lm_head.weight
    out = heads(h, W)  # (5, 3, V)
    # z @ W.T and F.linear(h, W) are different kernels: they may round differently (seen on AMD)
    for k in range(3):
        torch.testing.assert_close(out[:, k], tiny_llama.lm_head(h), rtol=1e-5, atol=1e-5)


def test_blocks_are_distinct_parameters():
    heads = MedusaHeads(HeadsConfig(C, V, num_heads=3, num_layers=2))
    weights = [b.linear.weight for blocks in heads.blocks for b in blocks]
    assert len({w.data_ptr() for w in weights}) == 6
    assert sum(p.numel() for p in heads.parameters()) == 6 * (C * C + C)
    with torch.no_grad():
        weights[0].add_(1.0)
    assert all(torch.count_nonzero(w) == 0 for w in weights[1:])


def toy_cache():
    """Two sequences: tokens 10..17 (assistant from index 3) and 20..24 (assistant from 1)."""
    tokens = torch.tensor(list(range(10, 18)) + list(range(20, 25)), dtype=torch.int32)
    return {"tokens": tokens, "base_next": tokens + 100, "hidden": torch.zeros(13, C, dtype=torch.float16),
            "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.uint8),
            "seq": torch.tensor([0] * 8 + [1] * 5, dtype=torch.int32)}


def test_label_shift_on_a_toy_sequence():
    positions, labels = head_targets(toy_cache(), num_heads=2, label_source="data")
    table = {int(p): labels[i].tolist() for i, p in enumerate(positions)}
    # head 0 at t predicts token t+2, head 1 token t+3; only assistant targets, never across sequences
    assert table[1] == [13, 14] and table[0] == [IGNORE, 13] and table[5] == [17, IGNORE]
    assert 6 not in table and 7 not in table  # targets would lie in the next sequence
    assert table[8] == [22, 23] and table[10] == [24, IGNORE]
    _, base_labels = head_targets(toy_cache(), num_heads=2, label_source="base")
    # "base": base_next[t+1+k], the base's own prediction for position t+2+k (base_next = tokens + 100 here)
    assert base_labels[(positions == 1).nonzero()[0, 0]].tolist() == [12 + 100, 13 + 100]


def test_greedy_labels_keep_only_positions_on_the_bases_own_path():
    cache = toy_cache()
    cache["base_next"] = torch.roll(cache["tokens"], -1)  # the base agrees with the data ...
    cache["base_next"][4] = 99  # ... except after token 4: token 5 is not what the base would say
    positions, labels = head_targets(cache, num_heads=2, label_source="greedy")
    table = {int(p): labels[i].tolist() for i, p in enumerate(positions)}
    # from t=3 the base's greedy path is token 4, then 99: head 0's label is 99, head 1 has no valid label
    assert table[3] == [99, IGNORE]
    assert 4 not in table  # token 5 is off the base's path from t=4
    assert table[2] == [14, 99]  # from t=2 the path is 13, 14, then the base's 99
    assert table[5] == [17, IGNORE]
    assert table[1] == [13, 14] and table[8] == [22, 23]



def test_the_label_table_shows_what_each_head_gets_and_where_greedy_drops_it():
    from medusa_lib.train import label_rows, label_window
    cache = toy_cache()
    cache["base_next"] = torch.roll(cache["tokens"], -1)
    cache["base_next"][4] = 99  # the data leaves the base's path after token 4 (as above)
    start, length = label_window(cache, num_heads=2, length=3)
    rows = label_rows(cache, 2, start, length)
    assert start == 2 and [r["t"] for r in rows] == [2, 3, 4]  # the first stretch with kept and dropped labels
    assert rows[0]["head 0 (t+2)"] == 14 and rows[0]["head 1 (t+3)"] == 99
    assert rows[1]["head 0 (t+2)"] == 99 and rows[1]["head 1 (t+3)"] is None
    assert rows[2]["head 0 (t+2)"] is None and rows[2]["next (data)"] == 15 and rows[2]["next (base)"] == 99

def synthetic_cache(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, C, generator=g)
    tokens = (hidden[:, :4].argmax(1) * 7 % V).to(torch.int32)  # a learnable function of the position
    base_next = torch.roll(tokens, -1)
    top_ids = torch.stack([(base_next + j) % V for j in range(TEACHER_TOPK)], 1).to(torch.int32)  # argmax first
    top_logits = torch.linspace(5, 0, TEACHER_TOPK).expand(n, -1).half()
    return {"tokens": tokens, "base_next": base_next, "hidden": hidden.half(), "top_ids": top_ids, "top_logits": top_logits,
            "loss_mask": torch.ones(n, dtype=torch.uint8), "seq": torch.zeros(n, dtype=torch.int32)}


def train(tmp_path, steps=40, **kw):
    cfg = get_config("tiny", train_steps=steps, eval_every=10, warmup_steps=2, batch_positions=64, lr=2e-2,
                     eval_positions=256, label_source="data")
    torch.manual_seed(0)
    lm_head = torch.randn(V, C)
    return train_heads(cfg, lm_head, synthetic_cache(), synthetic_cache(seed=1), tmp_path / "heads",
                       HeadsConfig(C, V, num_heads=2), **kw)


def test_loss_falls_on_a_tiny_run(tmp_path):
    log = train(tmp_path)["log"]
    eval0 = [r["loss"] for r in log if r["split"] == "eval" and r["step"] == 0]
    eval_end = [r["loss"] for r in log if r["split"] == "eval" and r["step"] == 40]
    assert all(b < 0.8 * a for a, b in zip(eval0, eval_end))


def test_interrupted_run_resumes_from_its_saved_step(tmp_path):
    full = train(tmp_path / "a")["heads"]

    def stop_at_20(rows):
        if max(int(r["step"]) for r in rows) == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", on_eval=stop_at_20)
    resumed = train(tmp_path / "b")
    assert resumed["resumed_from"] == 20
    for a, b in zip(full.state_dict().values(), resumed["heads"].state_dict().values()):
        assert torch.equal(a, b)  # bit-identical to the uninterrupted run
    assert resumed["train_seconds"] > 0  # the interrupted call's seconds and this one's
    assert training_time(resumed).startswith("40 steps: resumed at step 20, ")


def test_a_finished_run_called_again_says_how_long_it_trained_not_zero_seconds(tmp_path):
    first = train(tmp_path)
    assert first["resumed_from"] == 0 and 0 < first["train_seconds"] <= first["seconds"]
    again = train(tmp_path)  # nothing left to train: returns at once
    assert again["resumed_from"] == 40
    assert again["train_seconds"] == first["train_seconds"]  # read back from the checkpoint, not timed again
    saved = json.loads((tmp_path / "heads" / "heads_config.json").read_text())
    assert saved["train_seconds"] == first["train_seconds"]
    assert training_time(again) == f"40 steps, trained earlier in {first['train_seconds']:,.0f} s (finished: nothing to resume)"


def trained_heads(mode):
    torch.manual_seed(1)
    heads = MedusaHeads(HeadsConfig(C, V, num_heads=2, num_layers=2, head_output=mode), base_lm_head=torch.randn(V, C))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    return heads


@pytest.mark.parametrize("mode", ["shared", "own"])
def test_checkpoint_and_medusa_layout_round_trips_are_exact(tmp_path, mode):
    heads, lm_head = trained_heads(mode), torch.randn(V, C)
    back = load_heads(save_heads(heads, tmp_path / "ckpt"))
    layout = import_medusa_layout(export_medusa_layout(heads, tmp_path / "medusa", lm_head), lm_head)
    assert layout.config.head_output == mode
    h = torch.randn(4, C)
    for other in (back, layout):
        assert other.state_dict().keys() == heads.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), other.state_dict().values()))
        assert torch.equal(other(h, lm_head), heads(h, lm_head))


def test_mismatched_checkpoint_raises_a_clear_error(tmp_path, tiny_llama):
    save_heads(trained_heads("shared"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="hidden size 16 vs the base's 64.*retrain"):
        load_heads(tmp_path / "ckpt", tiny_llama)
    with pytest.raises(ValueError, match="holds 2 heads but 4"):
        load_heads(tmp_path / "ckpt", num_heads=4)
    with pytest.raises(FileNotFoundError, match="heads_config.json"):
        load_heads(tmp_path / "nothing")


def test_hidden_cache_matches_the_base_and_resumes(tmp_path, tiny_llama):
    examples = [{"input_ids": list(range(3, 3 + n)), "loss_mask": [0] * 2 + [1] * (n - 2)} for n in (7, 12, 5)]
    folder = build_hidden_cache(tiny_llama, examples, tmp_path, batch_tokens=24, shard_sequences=2)
    cache = load_hidden_cache(folder)
    with torch.no_grad():
        out = tiny_llama(torch.tensor([examples[1]["input_ids"]]), output_hidden_states=True)
    got = cache["hidden"][7:19].float()
    torch.testing.assert_close(got, out.hidden_states[-1][0], atol=2e-3, rtol=1e-2)  # fp16 storage
    assert torch.equal(cache["base_next"][7:19].long(), out.logits[0].argmax(-1))
    (folder / "manifest.json").unlink(); (folder / "shard_00001.safetensors").unlink()
    again = load_hidden_cache(build_hidden_cache(tiny_llama, examples, tmp_path, batch_tokens=24, shard_sequences=2))
    assert all(torch.equal(cache[k], again[k]) for k in cache)


# ----------------------------------------------------------------------------------------------
# Heads that see tokens (root-aware, sequential), wider blocks, a cut vocabulary

@pytest.mark.parametrize("token_inputs", ["root", "path"])
def test_fresh_token_heads_are_the_identity_and_path_heads_read_only_their_prefix(token_inputs):
    heads = MedusaHeads(HeadsConfig(C, V, num_heads=3, num_layers=2, token_inputs=token_inputs, block_expansion=2))
    lm_head, h, embeds = torch.randn(V, C), torch.randn(5, C), torch.randn(5, 3, C)
    torch.testing.assert_close(heads(h, lm_head, embeds), (h @ lm_head.T)[:, None].expand(5, 3, V))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    changed = embeds.clone()
    changed[:, 2] += 1.0  # only x_{t+3} changes: heads 0 and 1 never read it
    a, b = heads(h, lm_head, embeds), heads(h, lm_head, changed)
    assert torch.equal(a[:, :2], b[:, :2])
    assert (token_inputs == "path") == (not torch.equal(a[:, 2], b[:, 2]))


def test_cut_vocabulary_scores_the_kept_rows_and_maps_back_to_token_ids():
    keep = torch.tensor([3, 7, 11, 40])
    heads = MedusaHeads(HeadsConfig(C, V, num_heads=2, head_vocab=4), vocab_ids=keep)
    lm_head, h = torch.randn(V, C), torch.randn(6, C)
    full = MedusaHeads(HeadsConfig(C, V, num_heads=2))
    full.load_state_dict({k: v for k, v in heads.state_dict().items() if k != "vocab_ids"})
    torch.testing.assert_close(heads(h, lm_head), full(h, lm_head)[..., keep])
    assert heads.token_ids(torch.tensor([0, 3])).tolist() == [3, 40]


def test_frequent_vocab_keeps_what_the_base_writes_most():
    cache = toy_cache()
    cache["base_next"] = torch.tensor([5, 5, 9, 9, 9, 2, 9, 2, 2, 1, 1, 1, 1], dtype=torch.int32)
    # the base's choices for assistant tokens: rows 2-6 and 8-11 (9 four times, 1 three, 2 twice; 5 never)
    assert frequent_vocab(cache, 2).tolist() == [1, 9]


@pytest.mark.parametrize("variant", [dict(token_inputs="path", block_expansion=2, head_vocab=20),
                                     dict(token_inputs="root", head_target="soft")])
def test_token_heads_learn_and_round_trip_exactly(tmp_path, variant):
    """Trained in bf16 on every machine (as on CUDA and on CPUs with native bf16): the heads returned
    and the heads loaded back compute the same fp32 function, without accelerate's autocast wrapper."""
    target = variant.pop("head_target", "hard")
    cfg = get_config("tiny", train_steps=40, eval_every=20, warmup_steps=2, batch_positions=64, lr=2e-2,
                     eval_positions=256, label_source="data", head_target=target, train_precision="bf16")
    torch.manual_seed(0)
    lm_head, embed = torch.randn(V, C), torch.randn(V, C)
    result = train_heads(cfg, lm_head, synthetic_cache(), synthetic_cache(seed=1), tmp_path / "run",
                         HeadsConfig(C, V, num_heads=2, **variant), embed=embed)
    ev = [r for r in result["log"] if r["split"] == "eval"]
    first, last = ev[:2], ev[-2:]
    assert all(b["acc@5"] > a["acc@5"] for a, b in zip(first, last)), (first, last)
    heads, back = result["heads"], load_heads(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), back.state_dict().values()))
    h, embeds = torch.randn(4, C), embed[torch.randint(V, (4, 2))]
    assert torch.equal(back(h, lm_head, embeds), heads(h, lm_head, embeds))


def test_conditional_accuracy_counts_only_positions_whose_earlier_heads_were_right():
    heads = MedusaHeads(HeadsConfig(C, V, num_heads=2))
    lm_head = torch.eye(V, C)  # logits = the first C features of h: rank 1 is the largest feature
    hidden = torch.zeros(2, C)
    hidden[0, 3], hidden[1, 5] = 1.0, 1.0  # every head's top-1 is token 3 (row 0) or 5 (row 1)
    labels = torch.tensor([[3, 3], [40, 5]])  # row 1: head 0's label 40 is not in its top 5 (below)
    targets = Targets(torch.arange(2), labels, torch.zeros(2, 2, dtype=torch.long),
                      torch.zeros(2, 2, 1, dtype=torch.long), torch.zeros(2, 2, 1))
    hidden[1, 6:16] = 0.5  # ten tokens outrank 40 at row 1, so head 0 misses it even in its top 5
    m = evaluate_heads(heads, lm_head, hidden, targets)
    assert m[0]["acc@1"] == 0.5 and m[1]["acc@1"] == 1.0
    assert m[1]["cacc@1"] == 1.0 and m[1]["cacc@5"] == 1.0  # only row 0 counts for head 1 given a right path


def test_a_run_with_other_settings_never_overwrites_finished_heads(tmp_path):
    train(tmp_path)
    folder = tmp_path / "heads"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cfg = get_config("tiny", train_steps=20, eval_every=10, warmup_steps=2, batch_positions=64, lr=1e-2,
                     eval_positions=256, label_source="data")
    with pytest.raises(RunFolderTaken, match="holds heads trained with other settings: they are kept"):
        train_heads(cfg, torch.randn(V, C), synthetic_cache(), synthetic_cache(seed=1), folder, HeadsConfig(C, V, num_heads=3))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    tiny = get_config("tiny")
    assert run_dir(tiny).name == "heads" and run_dir(hydra_config(tiny)).name == "hydra"
    from medusa_lib.train import heads_dir
    assert heads_dir(tiny).name == "heads" and heads_dir(tiny.replace(num_heads=2)) == run_dir(tiny.replace(num_heads=2))
    assert run_dir(tiny.replace(num_heads=2, train_steps=30)).relative_to(tiny.data_dir).as_posix() == \
        "runs/num_heads-2_train_steps-30"


def test_cache_key_covers_the_loss_mask_and_the_weights(tmp_path, tiny_llama):
    import copy
    examples = [{"input_ids": list(range(3, 12)), "loss_mask": [0] * 4 + [1] * 5}]
    a = build_hidden_cache(tiny_llama, examples, tmp_path, batch_tokens=64)
    other_mask = [{**examples[0], "loss_mask": [0] * 2 + [1] * 7}]
    assert build_hidden_cache(tiny_llama, other_mask, tmp_path, batch_tokens=64) != a
    other_weights = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other_weights.model.layers[0].mlp.up_proj.weight.add_(0.01)
    assert build_hidden_cache(other_weights, examples, tmp_path, batch_tokens=64) != a
    assert build_hidden_cache(tiny_llama, examples, tmp_path, batch_tokens=64) == a


def test_damaged_checkpoints_get_a_clear_message(tmp_path):
    folder = save_heads(trained_heads("shared"), tmp_path / "ckpt")
    weights = folder / "heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"heads.safetensors is damaged or truncated .*retrain"):
        load_heads(folder)
    (folder / "heads_config.json").write_text('{"hidden_size": 16')
    with pytest.raises(ValueError, match=r"heads_config.json is damaged or incomplete"):
        load_heads(folder)
    medusa = export_medusa_layout(trained_heads("shared"), tmp_path / "medusa", torch.randn(V, C))
    cfg = json.loads((medusa / "config.json").read_text())
    (medusa / "config.json").write_text(json.dumps({**cfg, "medusa_num_heads": 3}))
    with pytest.raises(ValueError, match=r"does not match .*config.json \(3 heads x 2 layers\): missing \['2.0.linear"):
        import_medusa_layout(medusa)
    (medusa / "config.json").write_text(json.dumps({"medusa_num_layers": 2}))
    with pytest.raises(ValueError, match="needs medusa_num_heads and medusa_num_layers"):
        import_medusa_layout(medusa)


def test_a_widget_click_trains_its_own_run_and_leaves_the_main_run_untouched(tmp_path, monkeypatch, tiny_llama, capsys):
    from medusa_lib import train as train_module
    from medusa_lib.train import finished_runs, heads_dir, run_training
    from medusa_lib.widget import click_config, train_widget
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path))
    Cm, Vm = tiny_llama.config.hidden_size, tiny_llama.config.vocab_size
    caches = {}
    for split, seed in (("train", 0), ("eval", 1)):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, Vm, (400,), generator=g, dtype=torch.int32)
        caches[split] = {"tokens": tokens, "base_next": torch.roll(tokens, -1), "hidden": torch.randn(400, Cm, generator=g).half(),
                         "top_ids": torch.randint(0, Vm, (400, TEACHER_TOPK), generator=g, dtype=torch.int32),
                         "top_logits": torch.zeros(400, TEACHER_TOPK).half(),
                         "loss_mask": torch.ones(400, dtype=torch.uint8), "seq": torch.zeros(400, dtype=torch.int32)}
    cfg = get_config("tiny", train_steps=10, eval_every=5, warmup_steps=2, batch_positions=32, eval_positions=64)
    run_training(cfg, tiny_llama, None, caches=caches, out_dir=heads_dir(cfg), progress=False)  # the main run
    main = {p.name: p.read_bytes() for p in heads_dir(cfg).iterdir()}
    seen = []

    def watched(*args, **kwargs):
        seen.append(box.button.disabled)
        return run_training(*args, **kwargs)
    monkeypatch.setattr(train_module, "run_training", watched)
    box = train_widget(cfg, tiny_llama, None, caches, steps=10)
    box.sliders["num_heads"].value, box.sliders["token_inputs"].value = 2, "none"
    capsys.readouterr()
    box.button.click()
    assert seen == [True] and not box.button.disabled  # disabled while it trained
    said = capsys.readouterr().out  # (outside a kernel the Output widget does not capture)
    assert "Training failed" not in said and "10 steps trained in" in said
    assert {p.name: p.read_bytes() for p in heads_dir(cfg).iterdir()} == main
    clicked = run_dir(click_config(cfg, 2, cfg.num_layers, "none", cfg.lr, 10))
    assert clicked.parent.name == "runs" and (clicked / "log.csv").is_file()
    assert finished_runs(cfg) == {"Medusa-1": heads_dir(cfg), clicked.name: clicked}  # what the overlay plots
    scripted = run_dir(cfg.replace(num_heads=1, train_steps=4))  # a run a command line made: listed on request only
    run_training(cfg.replace(num_heads=1, train_steps=4), tiny_llama, None, caches=caches, out_dir=scripted, progress=False)
    assert scripted.name not in finished_runs(cfg) and finished_runs(cfg, every=True)[scripted.name] == scripted
    assert box.sliders["token_inputs"].options[0] == "none" and train_widget(cfg, tiny_llama, None, caches, 10).sliders[
        "token_inputs"].value == "none"  # the widget starts at the paper's Medusa-1 heads


def test_the_curve_explorer_redraws_into_its_output_without_capturing():
    import matplotlib.pyplot as plt
    import pandas as pd

    from medusa_lib.widget import runs_explorer
    rows = [{"split": "eval", "step": s, "head": h, "acc@1": 0.1 * s + h, "loss": 3.0 - 0.1 * s} for s in (1, 2, 3) for h in (0, 1)]
    plt.close("all")
    box = runs_explorer({"run": pd.DataFrame(rows)}, metrics=("acc@1", "loss"))
    first = box.output.outputs
    assert len(first) == 1 and first[0]["output_type"] == "display_data" and not plt.get_fignums()
    box.metric.value = "loss"  # a change redraws: one figure again, a new one, none left open
    assert len(box.output.outputs) == 1 and box.output.outputs[0] is not first[0] and not plt.get_fignums()


@pytest.mark.parametrize("extra_runs", [0, 8])  # a legend in the last panel; beside the panels
def test_the_runs_overlay_names_every_run_once_in_one_colour_also_with_fewer_heads(extra_runs):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    import pandas as pd

    from medusa_lib.plotting import plot_runs

    def log(num_heads):
        return pd.DataFrame([{"split": split, "step": s, "head": h, "acc@1": 0.1 * s, "loss": 3.0 - 0.1 * s}
                             for s in (0, 10) for h in range(num_heads) for split in ("eval", "train")])
    logs = {"four heads": log(4), "three heads": log(3), **{f"run {i}": log(4) for i in range(extra_runs)}}
    fig = plot_runs(logs, "acc@1")
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == list(logs)  # the 3-head run too
    for name in logs:  # one colour per run in every panel where it has a curve
        colours = {mcolors.to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines() if line.get_label() == name}
        assert len(colours) == 1, (name, colours)
    assert len({mcolors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}) == len(logs)
    plt.close(fig)


def test_a_truncated_training_state_is_named_and_fresh_replaces_it(tmp_path):
    from medusa_lib.train import RunFolderTaken
    train(tmp_path, steps=10)
    state = tmp_path / "heads" / "training_state.pt"
    heads_bytes = (tmp_path / "heads" / "heads.safetensors").read_bytes()
    state.write_bytes(state.read_bytes()[:200])  # cut mid-write (by a full disk, say)
    with pytest.raises(RunFolderTaken, match=r"training_state.pt cannot be read \(\w+\): the checkpoint is damaged or "
                                             r"truncated.*--fresh"):
        train(tmp_path, steps=10)
    assert (tmp_path / "heads" / "heads.safetensors").read_bytes() == heads_bytes  # nothing lost on refusal
    again = train(tmp_path, steps=10, resume=False)  # --fresh: starts afresh instead of failing the same way
    assert again["resumed_from"] == 0 and state.is_file()


def test_a_tokenizer_without_a_chat_template_is_refused_before_caching(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from medusa_lib.train import load_caches
    monkeypatch.setenv("WORKBOOK_DATA", str(tmp_path))
    cfg = get_config("tiny", base_model="some/base-model")
    with pytest.raises(ValueError, match="tokenizer of 'some/base-model' has no chat template"):
        load_caches(cfg, None, SimpleNamespace(chat_template=None))
    assert not (cfg.data_dir / "hidden_cache").exists()


def test_two_different_settings_never_share_a_run_folder():
    from medusa_lib.train import run_dir
    tiny = get_config("tiny")
    names = {run_dir(tiny.replace(**kw)) for kw in (dict(base_model="org/model"), dict(base_model="org-model"),
                                                    dict(base_model="x_num_layers-2"), dict(base_model="x", num_layers=2))}
    assert len(names) == 4
    assert run_dir(tiny.replace(num_heads=2)).name == "num_heads-2"  # plain names stay as they were


def test_a_run_resumed_on_other_data_is_refused_and_an_old_checkpoint_still_resumes(tmp_path):
    from medusa_lib.train import RunFolderTaken

    def stop_at_10(rows):
        if max(int(r["step"]) for r in rows) == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, steps=20, on_eval=stop_at_10)
    cfg = get_config("tiny", train_steps=20, eval_every=10, warmup_steps=2, batch_positions=64, lr=2e-2,
                     eval_positions=256, label_source="data")
    torch.manual_seed(0)
    other = synthetic_cache()
    other["tokens"] = (other["tokens"] + 1) % V  # records changed since: other tokens, same settings
    with pytest.raises(RunFolderTaken, match="trained on other data .*its heads are kept"):
        train_heads(cfg, torch.randn(V, C), other, synthetic_cache(seed=1), tmp_path / "heads", HeadsConfig(C, V, num_heads=2))
    state_path = tmp_path / "heads" / "training_state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["data_key"]  # a checkpoint written before data_key existed: resumes as it always did
    torch.save(state, state_path)
    assert train(tmp_path, steps=20)["resumed_from"] == 10
