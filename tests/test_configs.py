"""Every preset in configs/ loads, and the default preset is what `python train.py` runs."""

from pathlib import Path

import pytest

import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_default_preset_equals_the_defaults():
    assert train.parse_config(["--config", str(CONFIGS[0].parent / "default_cpu.yaml")]) == train.parse_config([])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_loads(path):
    cfg = train.parse_config(["--config", str(path)])
    assert cfg.prompts_per_step >= 1 and cfg.group_size >= 2


def test_8gpu_preset_has_the_reference_runs_settings():
    """configs/qwen2.5-7b_8gpu.yaml against the reference run (spec 7.1, 7.2; Trinity's verl defaults)."""
    cfg = train.parse_config(["--config", str(CONFIGS[0].parent / "qwen2.5-7b_8gpu.yaml")])
    assert (cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p) == (64, 5, 1024, 1.0, 1.0)
    assert (cfg.epochs, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm) == (4, 5e-7, 0.01, 1.0)
    assert (cfg.adv_scale, cfg.clip_low, cfg.clip_high, cfg.loss_agg) == ("group", 0.2, 0.2, "token-mean")
    assert (cfg.kl_coef, cfg.kl_estimator) == (0.001, "k2")
    assert (cfg.ppo_epochs, cfg.mini_batches, cfg.sync_interval, cfg.clip_ratio_c) == (1, 1, 10, 3.0)
    assert (cfg.judge, cfg.judge_model, cfg.train_mode, cfg.fusion_mode) == ("openai", "Qwen/Qwen2.5-32B-Instruct",
                                                                            "Ra+Rs", "default")
    assert train.steps_for_epochs(cfg.epochs, 6909, cfg.prompts_per_step) == 432  # ~RealMedConv's train samples
