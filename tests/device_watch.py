"""Finding tensors that production code makes without saying on which device, on a machine without a GPU.

On a GPU run, ``torch.arange(n)`` in the training path makes a CPU tensor, and the first operation that mixes it
with a CUDA tensor crashes. On CPU nothing crashes, so ``StrayFactoryWatch`` records every tensor factory
(``arange``, ``zeros``, ``tensor``, ...) called from l2a's own code (``l2a/``, ``train.py``) without a ``device``
argument. ``*_like`` factories and methods such as ``new_empty`` take their input's device and are fine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
OURS = (str(REPO / "l2a") + "/", str(REPO / "train.py"))
TORCH = str(Path(torch.__file__).parent)
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye}


class StrayFactoryWatch(TorchFunctionMode):
    """``with StrayFactoryWatch() as watch: ...``; then ``watch.strays`` lists ``file:line: factory`` entries."""

    def __init__(self) -> None:
        super().__init__()
        self.strays: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back  # past torch's own Python frames, to the code that called the factory
            if frame is not None and frame.f_code.co_filename.startswith(OURS):
                where = f"{Path(frame.f_code.co_filename).relative_to(REPO)}:{frame.f_lineno}"
                self.strays.append(f"{where}: torch.{func.__name__} without a device")
        return func(*args, **kwargs)
