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
