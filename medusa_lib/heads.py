"""Medusa heads (paper section 2.1.1): K extra heads on the base model's last hidden state, and the
workbook's extension: heads that also see tokens (docs/design.md, "Heads that see tokens").

Head k (0-based) at position t predicts the token at t+2+k (the base's lm_head predicts t+1).
Medusa-1 (`token_inputs="none"`): num_layers residual blocks x + SiLU(W x + b), W and b zero-initialised so
a fresh block is the identity, then a vocabulary layer: the base's frozen lm_head ("shared") or one
of its own initialised from it ("own"). Every block is its own module (never `[block] * n`).

Extensions, each a setting beside the paper's heads:
- `token_inputs="root"`: head k also sees the embedding of the root x_{t+1} (the base's own next
  token, known before the heads run); "path" (sequential, Hydra-style): head k sees x_{t+1} ..
  x_{t+1+k}, the root and the tokens drafted before it. The embeddings come from the base's frozen
  input embedding table and are fused into the head's input by a zero-initialised linear layer,
  x = h + W [h; e_1; ...; e_m] + b, so a fresh head is still the identity.
- `block_expansion=r`: wider blocks x + W2 SiLU(W1 x + b1) + b2 with W1: C -> r*C (W2 zero-initialised).
- `head_vocab=M`: the heads score only M frequent tokens (FR-Spec / VocabTrim); the base still
  decides every token, so outputs stay exact, and training and the heads' call get M/V cheaper.

Checkpoints: heads.safetensors + heads_config.json, written atomically, checked against the base
on load; plus export/import of the FasterDecoding layout (Medusa-1 heads only).

    heads = MedusaHeads(HeadsConfig.for_base(model, num_heads=4))
    logits = heads(hidden, model.lm_head.weight)        # (..., K, V)
    hydra = MedusaHeads(HeadsConfig.for_base(model, token_inputs="path"))
    logits = hydra(hidden, model.lm_head.weight, embeds)  # embeds (..., K, C) of x_{t+1} .. x_{t+K}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_lib.files import atomic_path, write_json

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads_config.json"
MEDUSA_WEIGHTS_FILE = "medusa_lm_head.safetensors"
MEDUSA_CONFIG_FILE = "config.json"
TOKEN_INPUTS = ("none", "root", "path")


@dataclass(frozen=True)
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    head_output: str = "shared"  # "shared" or "own"
    token_inputs: str = "none"  # "none" (Medusa-1), "root" (root-aware) or "path" (sequential, Hydra-style)
    block_expansion: int = 0  # 0: the paper's block x + SiLU(Wx + b); r: x + W2 SiLU(W1 x + b1) + b2, width r*C
    head_vocab: int = 0  # 0: the whole vocabulary; M: only the M tokens in `vocab_ids` are scored
    base_model: str = ""
    data_fingerprint: str = ""

    def __post_init__(self):
        if self.head_output not in ("shared", "own"):
            raise ValueError(f"head_output must be 'shared' or 'own', not {self.head_output!r}")
        if self.token_inputs not in TOKEN_INPUTS:
            raise ValueError(f"token_inputs must be one of {TOKEN_INPUTS}, not {self.token_inputs!r}")
        if self.num_heads < 1 or self.num_layers < 1 or self.block_expansion < 0 or not 0 <= self.head_vocab <= self.vocab_size:
            raise ValueError(f"Heads need num_heads >= 1, num_layers >= 1, block_expansion >= 0 and 0 <= head_vocab <= "
                             f"vocab_size; got {self.num_heads}, {self.num_layers}, {self.block_expansion}, {self.head_vocab}.")

    @classmethod
    def for_base(cls, model, **kwargs) -> "HeadsConfig":
        return cls(hidden_size=model.config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0], **kwargs)

    @property
    def classic(self) -> bool:
        """The paper's Medusa-1 heads (what the FasterDecoding layout can hold)."""
        return self.token_inputs == "none" and self.block_expansion == 0 and self.head_vocab == 0

    def tokens_seen(self, k: int) -> int:
        """How many token embeddings head k takes: 0, 1 (the root) or k+1 (root and drafted path)."""
        return {"none": 0, "root": 1, "path": k + 1}[self.token_inputs]


class ResBlock(nn.Module):
    """x + SiLU(W x + b) (the paper's block, width 0), or x + W2 SiLU(W1 x + b1) + b2 (width > 0).
    The last layer starts at zero, so a fresh block is the identity."""

    def __init__(self, hidden_size: int, width: int = 0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, width or hidden_size)
        self.out = nn.Linear(width, hidden_size) if width else None
        last = self.out if width else self.linear
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.linear(x))
        return x + (self.out(y) if self.out is not None else y)


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadsConfig, base_lm_head: torch.Tensor | None = None,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        C, V = config.hidden_size, config.head_vocab or config.vocab_size
        width = config.block_expansion * C
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(C, width) for _ in range(config.num_layers)]) for _ in range(config.num_heads)
        )
        self.fuse = None  # head k: x = h + W_k [h; e_1 .. e_m] + b_k
        if config.token_inputs != "none":
            self.fuse = nn.ModuleList(nn.Linear((1 + config.tokens_seen(k)) * C, C) for k in range(config.num_heads))
            for layer in self.fuse:
                nn.init.zeros_(layer.weight); nn.init.zeros_(layer.bias)
        if config.head_vocab:  # the kept token ids, saved with the heads
            ids = torch.arange(V) if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long)
            if ids.shape != (V,):
                raise ValueError(f"vocab_ids must hold head_vocab={V} token ids, not {tuple(ids.shape)}")
            self.register_buffer("vocab_ids", ids)
        else:
            self.vocab_ids = None
        self.lm_heads = None
        if config.head_output == "own":
            self.lm_heads = nn.ModuleList(nn.Linear(C, V, bias=False) for _ in range(config.num_heads))
            if base_lm_head is not None:
                for layer in self.lm_heads:
                    layer.weight.data.copy_(self._kept_rows(base_lm_head))

    def _kept_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(V, C) -> (M, C): the vocabulary rows the heads score."""
        return weight if self.vocab_ids is None else weight[self.vocab_ids.to(weight.device)]

    def head_hidden(self, k: int, h: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Head k's features before its vocabulary layer: h (..., C), embeds (..., m, C) -> (..., C)."""
        x = h
        if self.fuse is not None:
            m = self.config.tokens_seen(k)
            x = h + self.fuse[k](torch.cat([h, embeds[..., :m, :].flatten(-2)], dim=-1))  # (..., C)
        return self.blocks[k](x)

    def head_logits(self, k: int, h: torch.Tensor, base_lm_head: torch.Tensor | None = None,
                    embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One head's logits (..., M) over the scored vocabulary (the whole one unless head_vocab)."""
        z = self.head_hidden(k, h, embeds)  # (..., C)
        if self.lm_heads is not None:
            return self.lm_heads[k](z)
        if base_lm_head is None:
            raise ValueError("shared-output heads need the base lm_head weight")
        return z @ self._kept_rows(base_lm_head.detach()).T  # (..., M)

    def forward(self, h: torch.Tensor, base_lm_head: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) -> (..., K, M) logits. `base_lm_head` (V, C) is needed in "shared" mode and used as
        a constant, so no gradient reaches it. Heads that see tokens take `embeds` (..., K, C): the
        embeddings of x_{t+1} .. x_{t+K} (head k reads the first tokens_seen(k) of them)."""
        if self.fuse is not None and embeds is None:
            raise ValueError(f"heads with token_inputs={self.config.token_inputs!r} need the token embeddings")
        if self.fuse is None and self.lm_heads is None:  # Medusa-1: one matrix product for all heads
            z = torch.stack([blocks(h) for blocks in self.blocks], dim=-2)  # (..., K, C)
            if base_lm_head is None:
                raise ValueError("shared-output heads need the base lm_head weight")
            return z @ self._kept_rows(base_lm_head.detach()).T  # (..., K, M)
        return torch.stack([self.head_logits(k, h, base_lm_head, embeds) for k in range(self.config.num_heads)], dim=-2)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Indices into the scored vocabulary -> token ids."""
        return index if self.vocab_ids is None else self.vocab_ids.to(index.device)[index]


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


CHECKPOINT_FILES = ("heads_config.json", "heads.safetensors")


def checkpoint_fingerprint(head_dir: str | Path) -> str:
    """A hash of a heads checkpoint's files (config and weights): what an export or a copy made from
    the checkpoint records, so that a checkpoint trained again since is noticed."""
    import hashlib
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        path = Path(head_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {head_dir} is not a whole heads checkpoint (train it, notebook 02).")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_heads(head_dir: str | Path, model=None, num_heads: int | None = None) -> MedusaHeads:
    """Heads from a checkpoint folder; with `model`, checked against that base (and head count)."""
    head_dir = Path(head_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (head_dir / name).is_file():
            raise FileNotFoundError(f"{head_dir / name} is missing: train heads first (notebook 02) "
                                    f"or point to a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        raw = json.loads((head_dir / CONFIG_FILE).read_text())
        fields = {f.name for f in dataclasses.fields(HeadsConfig)}
        config = HeadsConfig(**{k: v for k, v in raw.items() if k in fields})
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise ValueError(f"{head_dir / CONFIG_FILE} is damaged or incomplete ({err}): retrain the heads "
                         f"(notebook 02) or restore the file.") from None
    if model is not None:
        check_compatible(config, model, str(head_dir))
    if num_heads is not None and num_heads != config.num_heads:
        raise ValueError(f"{head_dir} holds {config.num_heads} heads but {num_heads} were asked for: "
                         f"retrain with num_heads={num_heads} or use this checkpoint's head count.")
    heads = MedusaHeads(config)
    try:
        state = load_file(str(head_dir / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{head_dir / WEIGHTS_FILE} is damaged or truncated ({err}): retrain the heads "
                         f"(notebook 02) or restore the file.") from None
    try:
        missing, unexpected = heads.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        missing, unexpected = [str(err).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise ValueError(f"{head_dir / WEIGHTS_FILE} does not match its {CONFIG_FILE} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}): the checkpoint is damaged; retrain.")
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # the base would still verify every token, but the heads' guesses (and the speed) would be gone, quietly
        raise ValueError(f"{head_dir / WEIGHTS_FILE} holds non-finite weights ({bad[:3]}): the file is damaged or "
                         f"training diverged; retrain the heads (notebook 02) or restore the file.")
    return heads.eval()


def export_medusa_layout(heads: MedusaHeads, out_dir: str | Path, base_lm_head: torch.Tensor,
                         base_model: str = "") -> Path:
    """Write FasterDecoding's layout: keys '{k}.{j}.linear.weight/bias' for block j of head k and
    '{k}.{layers}.weight' for its vocabulary layer (the shared lm_head is copied into each head)."""
    if not heads.config.classic:
        raise ValueError("The FasterDecoding layout holds only the paper's Medusa-1 heads (token_inputs='none', "
                         "block_expansion=0, head_vocab=0); save these heads with save_heads instead.")
    out_dir = Path(out_dir)
    layers = heads.config.num_layers
    tensors = {}
    for k, blocks in enumerate(heads.blocks):
        for j, block in enumerate(blocks):
            tensors[f"{k}.{j}.linear.weight"] = block.linear.weight.detach().cpu().contiguous()
            tensors[f"{k}.{j}.linear.bias"] = block.linear.bias.detach().cpu().contiguous()
        vocab = heads.lm_heads[k].weight if heads.lm_heads is not None else base_lm_head
        tensors[f"{k}.{layers}.weight"] = vocab.detach().cpu().contiguous().clone()
    with atomic_path(out_dir / MEDUSA_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / MEDUSA_CONFIG_FILE, {
        "medusa_num_heads": heads.config.num_heads, "medusa_num_layers": layers,
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
    try:
        cfg = json.loads(cfg_path.read_text())
        K, layers = int(cfg["medusa_num_heads"]), int(cfg["medusa_num_layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path} is not a Medusa config ({err!r} missing or unreadable): it needs "
                         f"medusa_num_heads and medusa_num_layers.") from None
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{w_path} is damaged or truncated ({err}).") from None
    expected = {f"{k}.{j}.linear.{p}" for k in range(K) for j in range(layers) for p in ("weight", "bias")}
    expected |= {f"{k}.{layers}.weight" for k in range(K)}
    missing = sorted(expected - tensors.keys())
    extra = sorted(tensors.keys() - expected)
    if missing or extra:
        raise ValueError(f"{w_path} does not match {cfg_path} ({K} heads x {layers} layers): missing {missing[:3]}, "
                         f"unexpected {extra[:3]}. Fix medusa_num_heads / medusa_num_layers or use the matching weights.")
    vocab_layers = [tensors[f"{k}.{layers}.weight"] for k in range(K)]
    V, C = vocab_layers[0].shape
    shared = base_lm_head is not None and all(torch.equal(w, base_lm_head.cpu()) for w in vocab_layers)
    config = HeadsConfig(hidden_size=C, vocab_size=V, num_heads=K, num_layers=layers,
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
