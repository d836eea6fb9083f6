"""Medusa heads (paper section 2.1.1): K extra heads on the base model's last hidden state.

Head k (0-based) at position t predicts the token at t+2+k (the base's lm_head predicts t+1).
Each head is L residual blocks x + SiLU(W x + b), W and b zero-initialised so a fresh block is the
identity, followed by a vocabulary layer: the base's frozen lm_head ("shared") or one of its own
initialised from it ("own"). Every block is its own module (never `[block] * n`).

Checkpoints: heads.safetensors + heads_config.json, written atomically, checked against the base
on load; plus export/import of the FasterDecoding layout (medusa_lm_head.safetensors + config.json).

    heads = MedusaHeads(HeadsConfig.for_base(model, num_heads=4))
    logits = heads(hidden, model.lm_head.weight)        # (..., K, V)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_lib.files import atomic_path, write_json

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads_config.json"
MEDUSA_WEIGHTS_FILE = "medusa_lm_head.safetensors"
MEDUSA_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    head_output: str = "shared"  # "shared" or "own"
    base_model: str = ""
    data_fingerprint: str = ""

    def __post_init__(self):
        if self.head_output not in ("shared", "own"):
            raise ValueError(f"head_output must be 'shared' or 'own', not {self.head_output!r}")

    @classmethod
    def for_base(cls, model, **kwargs) -> "HeadsConfig":
        return cls(hidden_size=model.config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0], **kwargs)


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # a fresh block is the identity
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadsConfig, base_lm_head: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        C, V = config.hidden_size, config.vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(C) for _ in range(config.num_layers)]) for _ in range(config.num_heads)
        )
        self.lm_heads = None
        if config.head_output == "own":
            self.lm_heads = nn.ModuleList(nn.Linear(C, V, bias=False) for _ in range(config.num_heads))
            if base_lm_head is not None:
                for layer in self.lm_heads:
                    layer.weight.data.copy_(base_lm_head)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., K, C): each head's features before its vocabulary layer."""
        return torch.stack([blocks(h) for blocks in self.blocks], dim=-2)  # (..., K, C)

    def forward(self, h: torch.Tensor, base_lm_head: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) -> (..., K, V) logits. `base_lm_head` (V, C) is needed in "shared" mode; it is
        used as a constant, so no gradient reaches it."""
        z = self.hidden(h)  # (..., K, C)
        if self.lm_heads is None:
            if base_lm_head is None:
                raise ValueError("shared-output heads need the base lm_head weight")
            return z @ base_lm_head.detach().T  # (..., K, V)
        return torch.stack([layer(z[..., k, :]) for k, layer in enumerate(self.lm_heads)], dim=-2)  # (..., K, V)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_heads(heads: MedusaHeads, out_dir: str | Path, extra: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CONFIG_FILE, {**dataclasses.asdict(heads.config), **(extra or {})})
    return out_dir


def check_compatible(config: HeadsConfig, model, where: str) -> None:
    """Raise a clear error when heads do not fit the base model."""
    hidden = model.config.hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]
    problems = []
    if config.hidden_size != hidden:
        problems.append(f"hidden size {config.hidden_size} vs the base's {hidden}")
    if config.vocab_size != vocab:
        problems.append(f"vocabulary {config.vocab_size} vs the base's {vocab}")
    if problems:
        raise ValueError(f"Heads in {where} were trained for another base model ({'; '.join(problems)}; "
                         f"trained on {config.base_model or 'unknown'}): retrain them on this base (notebook 02).")


def load_heads(head_dir: str | Path, model=None, num_heads: int | None = None) -> MedusaHeads:
    """Heads from a checkpoint folder; with `model`, checked against that base (and head count)."""
    head_dir = Path(head_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (head_dir / name).is_file():
            raise FileNotFoundError(f"{head_dir / name} is missing: train heads first (notebook 02) "
                                    f"or point to a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}.")
    raw = json.loads((head_dir / CONFIG_FILE).read_text())
    fields = {f.name for f in dataclasses.fields(HeadsConfig)}
    config = HeadsConfig(**{k: v for k, v in raw.items() if k in fields})
    if model is not None:
        check_compatible(config, model, str(head_dir))
    if num_heads is not None and num_heads != config.num_heads:
        raise ValueError(f"{head_dir} holds {config.num_heads} heads but {num_heads} were asked for: "
                         f"retrain with num_heads={num_heads} or use this checkpoint's head count.")
    heads = MedusaHeads(config)
    state = load_file(str(head_dir / WEIGHTS_FILE))
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{head_dir / WEIGHTS_FILE} does not match its {CONFIG_FILE} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}): the checkpoint is damaged; retrain.")
    return heads.eval()


def export_medusa_layout(heads: MedusaHeads, out_dir: str | Path, base_lm_head: torch.Tensor,
                         base_model: str = "") -> Path:
    """Write FasterDecoding's layout: keys '{k}.{j}.linear.weight/bias' for block j of head k and
    '{k}.{L}.weight' for its vocabulary layer (the shared lm_head is copied into each head)."""
    out_dir = Path(out_dir)
    L = heads.config.num_layers
    tensors = {}
    for k, blocks in enumerate(heads.blocks):
        for j, block in enumerate(blocks):
            tensors[f"{k}.{j}.linear.weight"] = block.linear.weight.detach().cpu().contiguous()
            tensors[f"{k}.{j}.linear.bias"] = block.linear.bias.detach().cpu().contiguous()
        vocab = heads.lm_heads[k].weight if heads.lm_heads is not None else base_lm_head
        tensors[f"{k}.{L}.weight"] = vocab.detach().cpu().contiguous().clone()
    with atomic_path(out_dir / MEDUSA_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / MEDUSA_CONFIG_FILE, {
        "medusa_num_heads": heads.config.num_heads, "medusa_num_layers": L,
        "hidden_size": heads.config.hidden_size, "vocab_size": heads.config.vocab_size,
        "base_model_name_or_path": base_model or heads.config.base_model,
    })
    return out_dir


def import_medusa_layout(medusa_dir: str | Path, base_lm_head: torch.Tensor | None = None) -> MedusaHeads:
    """Read FasterDecoding's layout. When every head's vocabulary layer equals `base_lm_head`
    exactly, the heads come back in "shared" mode, else "own"."""
    medusa_dir = Path(medusa_dir)
    cfg_path, w_path = medusa_dir / MEDUSA_CONFIG_FILE, medusa_dir / MEDUSA_WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{medusa_dir} needs {MEDUSA_CONFIG_FILE} and {MEDUSA_WEIGHTS_FILE} (FasterDecoding Medusa layout).")
    cfg = json.loads(cfg_path.read_text())
    K, L = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
    tensors = load_file(str(w_path))
    vocab_layers = [tensors[f"{k}.{L}.weight"] for k in range(K)]
    V, C = vocab_layers[0].shape
    shared = base_lm_head is not None and all(torch.equal(w, base_lm_head.cpu()) for w in vocab_layers)
    config = HeadsConfig(hidden_size=C, vocab_size=V, num_heads=K, num_layers=L,
                         head_output="shared" if shared else "own",
                         base_model=cfg.get("base_model_name_or_path", ""))
    heads = MedusaHeads(config)
    for k, blocks in enumerate(heads.blocks):
        for j, block in enumerate(blocks):
            block.linear.weight.data.copy_(tensors[f"{k}.{j}.linear.weight"])
            block.linear.bias.data.copy_(tensors[f"{k}.{j}.linear.bias"])
        if not shared:
            heads.lm_heads[k].weight.data.copy_(vocab_layers[k])
    return heads.eval()
