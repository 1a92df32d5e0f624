"""Checkpoints: one folder per saved step, written atomically, and the trainer state read back safely.

    OUTPUT_DIR/checkpoints/step-000016/    the backend's files (local: a Hugging Face model directory)
                                           + trainer_state.pt (step counters, optimizer state or remote paths)
                                           + l2a_config.json (the run's Config)

Both backends (``l2a.local_policy``, ``l2a.tinker_backend``) write through ``write_checkpoint``: the folder is
filled under a temporary name and renamed when complete, so a checkpoint folder exists only once it is whole,
whenever the run is killed. ``trainer_state.pt`` is read with ``weights_only=True``: a checkpoint shared by
someone else can hold tensors, numbers and strings, never code to run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

STATE_FILE = "trainer_state.pt"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = sorted(checkpoints_dir(output_dir).glob("step-*"))
    return found[-1] if found else None


def write_checkpoint(output_dir: str | Path, step: int, config: Any, trainer_state: dict,
                     fill: Callable[[Path], None], keep: int,
                     on_prune: Callable[[Path], None] | None = None) -> Path:
    """``OUTPUT_DIR/checkpoints/step-N``: ``fill(folder)`` writes the backend's files, then the trainer state
    and the config are added; the folder appears under its name only when complete. Keeps the newest ``keep``;
    ``on_prune(folder)`` runs before an older folder is deleted (the Tinker backend deletes its remote copies)."""
    out = checkpoints_dir(output_dir)
    final, tmp = out / f"step-{step:06d}", out / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / "l2a_config.json").write_text(json.dumps(asdict(config), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(out.glob("step-*"))[:-keep]:
        if on_prune is not None:
            on_prune(old)
        shutil.rmtree(old)
    return final


def load_trainer_state(checkpoint: str | Path, mmap: bool = False) -> dict:
    """``trainer_state.pt`` of a checkpoint, loaded safely (tensors and plain data only). ``mmap``: read only
    what is touched (the optimizer state is twice the model's size; the counters are a few bytes)."""
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=True, mmap=mmap)


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the lines of a ``metrics.jsonl`` logged after ``step``: a run resumed from the checkpoint of ``step``
    then reads as if it had never stopped."""
    path = Path(path)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def resume_position(checkpoint: str | Path) -> tuple[int, int]:
    """(step, skipped_steps) of a checkpoint, without loading its optimizer state."""
    state = load_trainer_state(checkpoint, mmap=True)
    return state["step"], state["skipped_steps"]
