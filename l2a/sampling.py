"""Which policy to sample and how, in plain Python: the embedded default's name and ``SamplingConfig``.

Every rollout engine (``l2a.rollout``, ``l2a.vllm_engine``, ``l2a.tinker_backend``) and a served policy
(``python -m l2a.evaluate --policy-url``) read these. This module imports neither torch nor transformers, so a
command that only talks to endpoints never loads them: they cost seconds of CPU to import, and more than a second
again to tear down when the process exits, which is most of the time a Ctrl-C takes.
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDED_DEFAULT = "smollm2-135m"
"""Name that selects the embedded default model (``--model smollm2-135m``; loaded by ``l2a.model``)."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches top_p."""
    max_new_tokens: int = 64
    """Completion length limit (tokens)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating prompt or earlier tokens (the paper's evaluation uses 1.2)."""
    seed: int = 0
    """Seed of this call: the same seed, prompts and weights give the same completions."""
