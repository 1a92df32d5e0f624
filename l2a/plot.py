"""Training curves of a run as a PNG: ``python -m l2a.plot runs/default`` -> ``runs/default/curves.png``.

train.py's supervised warm start is logged at steps -sft_steps+1..0 and GRPO at 1..steps, so every panel shows both
stages on one axis (a dotted line at step 0 marks the switch); ``python -m l2a.sft`` runs have the SFT panel only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("Supervised warm start (SFT)", ["sft/loss", "sft/token_accuracy", "sft/decision_accuracy"]),
    ("Reward (train rollouts; eval/: held-out)", ["reward", "eval/reward"]),
    ("Reward parts (train rollouts)", ["decision_accuracy", "reward_content", "reward_format"]),
    ("Held-out decision accuracy", ["eval/decision_accuracy", "eval/stop_accuracy", "eval/ave_continue_decision"]),
    ("Held-out content and format", ["eval/ave_continue_content", "eval/win_continue_content", "eval/ave_total_format"]),
    ("Policy", ["entropy", "kl_mean", "clip_low_frac", "clip_high_frac"]),
    ("Groups and stops (train rollouts)", ["stop_rate", "frac_zero_std_groups"]),
    ("Completion length (tokens)", ["completion_length"]),
    ("Seconds per phase", ["time/generate", "time/judge", "time/train"]),
]
"""Panel title -> metrics.jsonl keys; a key a run did not log is left out (the eval/ names are those of
``l2a.metrics.compute_metrics``, see train.py's ``evaluate_heldout``)."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is this a run directory of train.py?)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    warm_start = any(r["step"] < 0 for r in rows)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
        if warm_start:
            ax.axvline(0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="A train.py output directory (holds metrics.jsonl).")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png).")
    args = parser.parse_args()
    try:
        print(plot_run(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
