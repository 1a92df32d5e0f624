"""bench/gpu_smoke.py cannot rot: its reduced CPU mode (2 gloo processes, FSDP2, checkpointing, KL, save, resume)
runs in every CI run; the GPU mode is the same script with a larger model and bf16."""

import pytest
from subprocesses import python, run_to_end


@pytest.mark.slow
def test_gpu_smoke_runs_in_its_cpu_mode(tmp_path):
    done = run_to_end(python("bench/gpu_smoke.py", "--cpu", "--out", str(tmp_path)), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "steps logged [1, 2, 3]" in done.stdout and "| train |" in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "model.safetensors").exists()
