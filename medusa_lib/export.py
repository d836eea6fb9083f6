"""ONNX export of the base model (with tree attention) and of the Medusa heads (paper 2.1.2).

Stock exports (optimum) build a causal mask from a 2-D mask and cannot express a tree, so the base
graph here takes the mask itself, as an additive bias:
  inputs   input_ids [1, T] int64, position_ids [1, T] int64,
           attention_bias [1, 1, T, P+T] float (0 = attend, large negative = masked),
           past_key_values.{i}.key / .value  [1, P, kv_heads, head_dim]
  outputs  logits [1, T, V], hidden_states [1, T, C] (after the final norm),
           present.{i}.key / .value  [1, T, kv_heads, head_dim]  -- only the T new rows.
The cache is sequence-major, so the first P rows of a preallocated [1, capacity, ...] buffer are one
contiguous block that ORT reads in place, and the T new rows are written in place after them
(IO binding, see decoding.py). The heads graph maps hidden_states [B, C] (and, for root-aware
heads, token_embeddings [B, 1, C] of the root) to each head's top-k ids and probabilities
[B, K, topk]. Sequential heads get one graph per head, heads_{k}.onnx: hidden_states [B, C] and
token_embeddings [B, k+1, C] of the root and the path before it -> top-k ids and probabilities
[B, topk]; the base's input embedding table is saved beside them (token_embeddings.npy) so the
decoding loop can look the path's tokens up. Llama-family bases (Llama, Vicuna, Mistral, Qwen2/3, SmolLM) are
supported: the wrapper reuses the model's own projections, norms and rotary embedding.

    paths = export_medusa(model, heads, "data/onnx", topk=10)
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from medusa_lib.fast_graph import FAST_GRAPH_VERSION
from medusa_lib.files import folder_lock, read_json, write_json
from medusa_lib.heads import MedusaHeads

BASE_FILE = "base.onnx"
HEADS_FILE = "heads.onnx"
INFO_FILE = "export_info.json"
EMBED_FILE = "token_embeddings.npy"
INFO_KEYS = ("files", "topk", "dtype", "num_layers", "kv_heads", "head_dim", "hidden_size", "vocab_size", "num_heads",
             "eos_token_ids")
EXTERNAL_DATA_LIMIT = 2 * 1024**3  # protobuf's 2 GB limit
MASKED = -30000.0  # additive bias for masked positions: finite in fp16 (max 65504), and exp() of it is 0


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj"):
        raise NotImplementedError(f"{type(model).__name__} is not a Llama-family decoder (model.layers[i].self_attn.q_proj): "
                                  f"this export supports Llama, Vicuna, Mistral, Qwen2/3 and SmolLM bases.")
    return inner, layers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TreeStep(nn.Module):
    """One forward of T new tokens against P cached ones under an explicit attention bias."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inner, self.layers = _layers(model)

    def forward(self, input_ids, position_ids, attention_bias, *past):
        T = input_ids.shape[1]
        x = self.inner.embed_tokens(input_ids)  # (1, T, C)
        cos, sin = self.inner.rotary_emb(x, position_ids)  # (1, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, D)
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            D = attn.head_dim
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, T, -1, D)  # (1, T, H, D)
            k = attn.k_proj(h).view(1, T, -1, D)  # (1, T, Hkv, D)
            v = attn.v_proj(h).view(1, T, -1, D)  # (1, T, Hkv, D)
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q.transpose(1, 2)  # (1, H, T, D)
            k = k.transpose(1, 2)  # (1, Hkv, T, D)
            q = q * cos + _rotate_half(q) * sin
            k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)  # (1, T, Hkv, D)
            presents += [k, v]
            keys = torch.cat([past[2 * i], k], dim=1).transpose(1, 2)  # (1, Hkv, P+T, D)
            values = torch.cat([past[2 * i + 1], v], dim=1).transpose(1, 2)  # (1, Hkv, P+T, D)
            groups = q.shape[1] // keys.shape[1]  # grouped-query attention: each kv head serves `groups` heads
            S = keys.shape[2]
            keys = keys[:, :, None].expand(1, keys.shape[1], groups, S, D).reshape(1, -1, S, D)  # (1, H, P+T, D)
            values = values[:, :, None].expand(1, values.shape[1], groups, S, D).reshape(1, -1, S, D)  # (1, H, P+T, D)
            scores = (q @ keys.transpose(-1, -2)) * attn.scaling + attention_bias  # (1, H, T, P+T)
            out = scores.softmax(-1) @ values  # (1, H, T, D)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, T, -1))  # (1, T, C)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.inner.norm(x)  # (1, T, C)
        return (self.model.lm_head(hidden), hidden, *presents)


class HeadsTopK(nn.Module):
    """Hidden states (B, C) [+ token embeddings (B, m, C)] -> top-k ids and probabilities, for every
    head (B, K, topk), or for head `head` alone (B, topk) (sequential heads: one graph per head)."""

    def __init__(self, heads: MedusaHeads, lm_head: torch.Tensor, topk: int, head: int | None = None):
        super().__init__()
        self.heads, self.topk, self.head = heads, topk, head
        self.lm_head = nn.Parameter(lm_head.detach().clone(), requires_grad=False)  # an initializer, so it can be quantised

    def forward(self, hidden_states, token_embeddings=None):
        shared = self.lm_head if self.heads.lm_heads is None else None
        if self.head is None:
            logits = self.heads(hidden_states, shared, token_embeddings)  # (B, K, M)
        else:
            logits = self.heads.head_logits(self.head, hidden_states, shared, token_embeddings)  # (B, M)
        top = logits.softmax(-1).topk(self.topk, dim=-1)  # (B, [K,] topk)
        return self.heads.token_ids(top.indices), top.values


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the base."""
    _, layers = _layers(model)
    attn = layers[0].self_attn
    kv_heads = attn.k_proj.out_features // attn.head_dim
    return len(layers), kv_heads, attn.head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{part}" for i in range(num_layers) for part in ("key", "value")]
    return (["input_ids", "position_ids", "attention_bias"] + [f"past_key_values.{n}" for n in kv],
            ["logits", "hidden_states"] + [f"present.{n}" for n in kv])


def causal_bias(past: int, new: int, dtype=np.float32) -> np.ndarray:
    """(1, 1, new, past+new) additive bias: every new token sees the past and earlier new tokens."""
    bias = np.zeros((1, 1, new, past + new), dtype=dtype)
    bias[0, 0, :, past:][np.triu(np.ones((new, new), dtype=bool), 1)] = MASKED
    return bias


def _save(raw_path: Path, out_path: Path) -> None:
    """Re-save a freshly exported file, with external data when over protobuf's 2 GB limit; the
    .onnx file is renamed into place last, so an interrupted export is never taken for a good one."""
    proto = onnx.load(str(raw_path))
    large = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_LIMIT - (64 << 20)
    tmp = out_path.with_name(out_path.name + ".partial")
    onnx.save_model(proto, str(tmp), save_as_external_data=large,
                    location=out_path.name + ".data" if large else None)
    os.replace(tmp, out_path)


def export_base(model, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Export the base's tree step to out_dir/base.onnx (fp32, or fp16 for CUDA)."""
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).dtype != dtype:  # a converted copy: the caller's model stays as it was
        model = copy.deepcopy(model).to(dtype=dtype)
    layers, Hkv, D = kv_shape(model)
    P, T = 3, 2  # example sizes; both axes are dynamic
    device = next(model.parameters()).device
    past = [torch.zeros(1, P, Hkv, D, dtype=dtype, device=device) for _ in range(2 * layers)]
    ids = torch.zeros(1, T, dtype=torch.long, device=device)
    pos = torch.arange(P, P + T, device=device)[None]
    bias = torch.from_numpy(causal_bias(P, T)).to(device=device, dtype=dtype)
    names_in, names_out = io_names(layers)
    dynamic = {"input_ids": {1: "T"}, "position_ids": {1: "T"}, "attention_bias": {2: "T", 3: "P_plus_T"},
               "logits": {1: "T"}, "hidden_states": {1: "T"}}
    dynamic.update({n: {1: "P"} for n in names_in[3:]})
    dynamic.update({n: {1: "T"} for n in names_out[2:]})
    raw = out_dir / (BASE_FILE + ".raw")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TreeStep(model).eval(), (ids, pos, bias, *past), str(raw), input_names=names_in,
                          output_names=names_out, dynamic_axes=dynamic, opset_version=17, dynamo=False)
    _save(raw, out_dir / BASE_FILE)
    raw.unlink()
    return out_dir / BASE_FILE


def export_heads(heads: MedusaHeads, lm_head: torch.Tensor, out_dir: str | Path, topk: int,
                 dtype: torch.dtype = torch.float32) -> list[Path]:
    """heads.onnx (all heads in one call), or heads_0.onnx .. heads_{K-1}.onnx for sequential heads."""
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    config, device = heads.config, lm_head.device
    C = config.hidden_size
    if topk > (config.head_vocab or config.vocab_size):
        raise ValueError(f"topk={topk} is larger than the {config.head_vocab or config.vocab_size} tokens the heads score.")
    sequential = config.token_inputs == "path"
    paths = []
    for head in (range(config.num_heads) if sequential else [None]):
        module = HeadsTopK(heads, lm_head, topk, head).to(device=device, dtype=dtype).eval()
        m = config.tokens_seen(head if sequential else 0)
        inputs = (torch.zeros(2, C, dtype=dtype, device=device),)
        names, dynamic = ["hidden_states"], {"hidden_states": {0: "B"}, "head_topk_ids": {0: "B"}, "head_topk_probs": {0: "B"}}
        if m:
            inputs += (torch.zeros(2, m, C, dtype=dtype, device=device),)
            names.append("token_embeddings"); dynamic["token_embeddings"] = {0: "B"}
        path = out_dir / (f"heads_{head}.onnx" if sequential else HEADS_FILE)
        raw = path.with_name(path.name + ".raw")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, inputs, str(raw), input_names=names, output_names=["head_topk_ids", "head_topk_probs"],
                              dynamic_axes=dynamic, opset_version=17, dynamo=False)
        _save(raw, path)
        raw.unlink()
        paths.append(path)
    return paths


def quantize_heads(path: Path) -> None:
    """int8 weights (dynamic quantisation) for the heads graph only. The heads merely propose and
    the fp32 base verifies, so outputs stay exact; the heads' vocabulary layer reads 4x fewer bytes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.name + ".int8")
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process the model (shape inference) is for static quantisation
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
    finally:
        logging.disable(level)
    os.replace(tmp, path)


def export_medusa(model, heads: MedusaHeads | None, out_dir: str | Path, topk: int, fp16: bool = False,
                  base_model: str = "", int8_heads: bool = False, heads_fingerprint: str | None = None,
                  quantised: tuple[str, ...] = ("int8", "q4"), share_base_with: str | Path | None = None) -> dict:
    """Export base (and heads, when given) and write export_info.json; returns the info dict.
    Beside the fp32 fast graph, one fast graph per weight set in `quantised` (quant.py); q4 needs a base
    loaded from a Q4_1 GGUF (`base_model` names it) and is skipped, saying why, otherwise.

    share_base_with: another export folder (notebook 04 passes the Medusa-1 export when it exports the
    sequential heads). Where that export was made from the same base (`base_fingerprint`), its base
    graphs are linked instead of exported again: one copy on disk, and seconds instead of a minute.

    Everything is written into a sibling folder <out_dir>.partial first and swapped in at the end, so
    an interrupted re-export never leaves a folder whose graphs and export_info.json disagree."""
    with folder_lock(Path(out_dir).parent, f"ONNX export to {Path(out_dir).name}"):
        out_dir = Path(out_dir)
        work = out_dir.with_name(out_dir.name + ".partial")
        _recover(out_dir)  # an export interrupted between its two renames: its complete copy goes back first
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.time()
        fingerprint = base_fingerprint(model, fp16, base_model, quantised)
        shared = _link_base(share_base_with, fingerprint, work)
        if shared is None:
            base = _export_base_graphs(model, work, fp16, quantised, base_model)
        else:
            base = {"files": {k: v for k, v in shared["files"].items() if k != "heads"},
                    "fast_graph": shared["fast_graph"], "quantised": shared["quantised"],
                    "base_shared_with": Path(share_base_with).name}
        head_files = []
        if heads is not None:
            dtype = torch.float16 if fp16 else torch.float32
            lm_head = model.get_output_embeddings().weight.detach()
            head_files = export_heads(heads.to(device=lm_head.device), lm_head, work, topk, dtype)
            int8_heads = int8_heads and not fp16  # int8 is for CPU kernels; fp16 graphs are for the GPU
            if int8_heads:
                for path in head_files:
                    quantize_heads(path)
            if heads.config.token_inputs != "none":
                table = model.get_input_embeddings().weight.detach().float().cpu().numpy()  # (V, C)
                np.save(work / EMBED_FILE, table.astype(np.float16 if fp16 else np.float32))
        layers, Hkv, D = kv_shape(model)
        config = heads.config if heads is not None else None
        info = {**base, "files": {**base["files"], "heads": [p.name for p in head_files]},
                "fast_graph_version": FAST_GRAPH_VERSION, "topk": topk,
                "dtype": "float16" if fp16 else "float32", "num_layers": layers,
                "kv_heads": Hkv, "head_dim": D, "hidden_size": model.config.hidden_size,
                "vocab_size": model.get_output_embeddings().weight.shape[0],
                "num_heads": config.num_heads if config else 0,
                "token_inputs": config.token_inputs if config else "none",
                "head_vocab": config.head_vocab if config else 0,
                "eos_token_ids": _eos_ids(model), "base_model": base_model, "int8_heads": bool(int8_heads and heads is not None),
                "heads_fingerprint": heads_fingerprint,  # the checkpoint's files it was made from (heads.checkpoint_fingerprint)
                "base_fingerprint": fingerprint,  # what the base graphs were made from (base_fingerprint)
                "seconds": round(time.time() - t0, 1)}
        write_json(work / INFO_FILE, info)
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return info


def _export_base_graphs(model, work: Path, fp16: bool, quantised: tuple[str, ...], base_model: str) -> dict:
    """The reference base graph, and beside it the fast graph and its quantised weight sets where they
    apply: {"files": {...}, "fast_graph": "written" or why not, "quantised": {set: report or why not}}."""
    export_base(model, work, torch.float16 if fp16 else torch.float32)
    fast_file, fast_note = None, None  # the fast graph (fast_graph.py) beside the reference one, where it applies
    quantised_files, quantised_info = {}, {}
    from medusa_lib.fast_graph import export_fast_base, fast_graph_problem
    fast_note = fast_graph_problem(model)
    if fast_note is None:
        fast_file = export_fast_base(model, work, fp16=fp16)[0].name  # fp16 in an fp16 export (what CUDA runs)
        if not fp16:
            quantised_files, quantised_info = _export_quantised(model, work, quantised, base_model)
    for weights in quantised:
        quantised_info.setdefault(weights, {"skipped": fast_note or "fp16 export: the quantised weight sets are "
                                                                    "written beside an fp32 export only"})
    return {"files": {"base": BASE_FILE, "base_fast": fast_file, "base_fast_skipped": fast_note, **quantised_files},
            "fast_graph": fast_note or "written", "quantised": quantised_info}


def base_fingerprint(model, fp16: bool, base_model: str, quantised: tuple[str, ...]) -> str:
    """What an export's base graphs are made from: the model's weights (every parameter and buffer,
    hashed), the precision, the weight sets and the fast graph's version. Two exports with the same
    fingerprint hold the same base graphs."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr((fp16, base_model, tuple(quantised), FAST_GRAPH_VERSION)).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _link_base(source: str | Path | None, fingerprint: str, work: Path) -> dict | None:
    """Link the base graphs of the export in `source` into `work` when it was made from the same base;
    returns that export's info, or None (then the base is exported). An export never rewrites a file
    in place (it writes a new folder and swaps it in), so a linked file stays whole when either export
    is redone. Where the file system has no hard links, the files are copied."""
    if source is None or not (Path(source) / INFO_FILE).is_file():
        return None
    info = read_json(Path(source) / INFO_FILE)
    if info.get("base_fingerprint") != fingerprint:
        return None
    names = [v for k, v in info["files"].items() if (k == "base" or k.startswith("base_fast")) and isinstance(v, str)]
    names += [f"{name}.data" for name in names if (Path(source) / f"{name}.data").is_file()]  # external weights
    if not all((Path(source) / name).is_file() for name in names):
        return None
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            os.link(Path(source) / name, work / name)
        except OSError:
            shutil.copyfile(Path(source) / name, work / name)
    return info


def _export_quantised(model, work: Path, sets: tuple[str, ...], base_model: str) -> tuple[dict, dict]:
    """The quantised fast graphs: ({"base_fast_<set>": file}, {set: weight error report or {"skipped": why}})."""
    import warnings

    from medusa_lib.base import gguf_source
    from medusa_lib.fast_graph import export_fast_base
    from medusa_lib.quant import NoQ4Blocks, NoQuantisedGraph

    files, reports = {}, {}
    for weights in sets:
        try:
            path, report = export_fast_base(model, work, weights=weights, gguf_path=gguf_source(base_model))
        except NoQuantisedGraph as err:  # said out loud, except a base from Hugging Face having no Q4_1 blocks
            if not isinstance(err, NoQ4Blocks) or gguf_source(base_model) is not None:
                warnings.warn(f"No {weights} graph: {err}", stacklevel=3)
            reports[weights] = {"skipped": str(err)}
            continue
        files[f"base_fast_{weights}"] = path.name
        reports[weights] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in report.items()}
    return files, reports


def _complete_copy(out_dir: Path) -> Path | None:
    """Where an export interrupted between its two renames left a whole copy (export_info.json is
    written last, so a folder holding it is complete): the new one (.partial), else the old one (.old)."""
    if (out_dir / INFO_FILE).is_file():
        return None
    for suffix in (".partial", ".old"):
        copy = out_dir.with_name(out_dir.name + suffix)
        if (copy / INFO_FILE).is_file():
            return copy
    return None


def _recover(out_dir: Path) -> None:
    copy = _complete_copy(out_dir)
    if copy is not None:
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an incomplete folder without export_info.json
        os.replace(copy, out_dir)


def export_fp16(cfg) -> bool:
    """Whether cfg asks for fp16 graphs (export_dtype "float16": faster on a GPU, not lossless there)."""
    return cfg.export_dtype == "float16"


def read_export_info(export_dir: str | Path) -> dict:
    """export_info.json of an export folder, checked for every key the decoding loop reads."""
    path = Path(export_dir) / INFO_FILE
    if not path.is_file():
        copy = _complete_copy(Path(export_dir))
        if copy is not None:
            raise FileNotFoundError(f"{path} is missing, but {copy} holds a complete export (an export was interrupted "
                                    f"between its two renames): rename {copy.name} to {Path(export_dir).name}, or export "
                                    f"again (notebook 04), which puts it back first.")
        raise FileNotFoundError(f"{path} is missing: {Path(export_dir)} is not an export; run notebook 04 (ONNX export).")
    info = read_json(path)
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not an export's description (a JSON object); re-export (notebook 04).")
    missing = [k for k in INFO_KEYS if k not in info]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was written by another version or damaged; re-export (notebook 04).")
    wrong = [f"{k}={info[k]!r}" for k in INFO_KEYS if not _info_value_ok(k, info[k])]
    if wrong:
        raise ValueError(f"{path} holds values no export writes ({', '.join(wrong)}): it was edited or damaged; "
                         f"re-export (notebook 04).")
    return info


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _info_value_ok(key: str, value) -> bool:
    """The type (and range) export_medusa writes for each of INFO_KEYS."""
    if key == "files":
        return isinstance(value, dict) and isinstance(value.get("heads", []), list)
    if key == "dtype":
        return value in ("float32", "float16")
    if key == "eos_token_ids":
        return isinstance(value, list) and all(_whole(e, 0) for e in value)
    return _whole(value, 0 if key == "num_heads" else 1)


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def resolve_export_dir(cfg, heads: str | Path | None = None) -> Path:
    """The exported ONNX folder for `--heads DIR`: DIR itself when it holds an export, DIR/onnx
    (exported now if missing) when it holds a heads checkpoint, else the workbook's data/<preset>/onnx."""
    if heads is None:
        folder = cfg.data_dir / "onnx"
        if not (folder / INFO_FILE).is_file():
            raise FileNotFoundError(f"No exported model in {folder}: run notebook 04 (ONNX export) first, or pass --heads DIR.")
        from medusa_lib.train import heads_dir
        info = read_export_info(folder)
        want = "float16" if export_fp16(cfg) else "float32"
        if info.get("dtype") != want:  # never decode other graphs than the settings ask for
            raise ValueError(f"{folder} holds {info.get('dtype')} graphs but export_dtype is {want!r}: run notebook 04 "
                             f"(ONNX export) again with these settings, or pass --heads DIR (exported there).")
        made = info.get("heads_fingerprint")
        source = heads_dir(cfg)  # what notebook 04 exports into data/<preset>/onnx
        if made and (source / "heads_config.json").is_file():
            from medusa_lib.heads import checkpoint_fingerprint
            if checkpoint_fingerprint(source) != made:
                raise ValueError(f"{folder} was exported from other heads than {source} holds now (trained again since): "
                                 f"run notebook 04 (ONNX export) again.")
        return folder
    heads = Path(heads)
    if (heads / INFO_FILE).is_file():
        return heads
    if (heads / "heads_config.json").is_file():
        from medusa_lib.heads import checkpoint_fingerprint
        folder, current = heads / "onnx", checkpoint_fingerprint(heads)
        made = read_export_info(folder) if (folder / INFO_FILE).is_file() else None
        wanted = {"heads_fingerprint": current, "topk": cfg.topk, "dtype": "float16" if export_fp16(cfg) else "float32",
                  "fast_graph_version": FAST_GRAPH_VERSION}
        stale = made is not None and {k: made.get(k) for k in wanted} != wanted
        if made is None or stale:  # none yet, or made from heads trained again since (or other export settings)
            from medusa_lib.base import load_base
            from medusa_lib.heads import load_heads
            if stale:
                print(f"{folder} was exported from other heads or settings than {heads} holds now: exporting again.")
            model, _ = load_base(cfg.base_model, "cpu", "float32")
            export_medusa(model, load_heads(heads, model), folder, cfg.topk, base_model=cfg.base_model,
                          int8_heads=cfg.int8_heads, fp16=export_fp16(cfg), heads_fingerprint=current)
        return folder
    raise FileNotFoundError(f"{heads} holds neither an ONNX export ({INFO_FILE}) nor a heads checkpoint (heads_config.json).")
