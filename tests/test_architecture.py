"""The layout's promises: imports point one way, so a reader (and a light install) can use a part alone.

Each module is imported in a fresh interpreter and we look at what came with it.
"""

import json

import pytest
from subprocesses import command_env, python, run_to_end
from test_evaluate import SAMPLES


def loaded_with(module: str) -> set[str]:
    script = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    done = run_to_end(python("-c", script), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {name.split(".")[0] if not name.startswith("l2a.") else name for name in json.loads(done.stdout)}


@pytest.mark.parametrize("module", ["l2a.data", "l2a.reward", "l2a.judges", "l2a.metrics", "l2a.prompts"])
def test_data_reward_and_judges_need_neither_torch_nor_a_model(module):
    loaded = loaded_with(module)
    assert not loaded & {"torch", "transformers", "vllm", "tinker"}, sorted(loaded & {"torch", "transformers"})


def test_evaluating_a_served_policy_loads_neither_torch_nor_transformers(tmp_path):
    """``python -m l2a.evaluate --policy-url`` only talks to endpoints. Loading torch and transformers would cost it
    seconds of CPU at the start and more than a second at the exit, most of what a Ctrl-C takes (on a loaded
    machine, longer than tests/test_interrupts.py allows: issue 10)."""
    stop_sample = next(s for s in SAMPLES if s["decision_truth"] == "stop")
    (tmp_path / "test.jsonl").write_text(json.dumps(stop_sample) + "\n")
    script = f"""
import json, sys
sys.path.insert(0, "tests")
from openai_stub import ChatStub
from l2a.evaluate import main
from l2a.prompts import STOP_TOKEN
with ChatStub(lambda request: STOP_TOKEN) as policy:
    status = main(["--policy-url", policy.base_url, "--policy-model", "served", "-n", "1",
                   "--test-file", {str(tmp_path / "test.jsonl")!r}, "--out", {str(tmp_path / "out")!r}])
print(json.dumps([status, sorted(sys.modules)]))
"""
    done = run_to_end(python("-c", script), timeout=120, env=command_env(OPENAI_API_KEY="k"))
    status, modules = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else (None, [])
    assert status == 0, done.stderr[-2000:]
    assert not {name.split(".")[0] for name in modules} & {"torch", "transformers"}


def test_grpo_needs_only_torch():
    loaded = loaded_with("l2a.grpo")
    assert "torch" in loaded and not loaded & {"transformers", "l2a.reward", "l2a.judges", "l2a.data"}


def test_rollout_knows_models_not_rewards():
    loaded = loaded_with("l2a.rollout")
    assert "transformers" in loaded and not loaded & {"l2a.reward", "l2a.judges", "l2a.metrics", "l2a.data"}


def test_training_with_the_offline_judge_needs_no_openai():
    """The GPU machines this project uses have no openai package: train.py, the torch policy and the rubric judge
    must import without it (it is imported where a request to an endpoint is made)."""
    script = """
import sys
class NoOpenAI:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "openai":
            raise ImportError("no openai here")
sys.meta_path.insert(0, NoOpenAI())
import train, l2a.local_policy, l2a.judges
print(type(l2a.judges.make_judge("rubric")).__name__)
"""
    done = run_to_end(python("-c", script), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "RubricJudge", done.stderr[-2000:]
