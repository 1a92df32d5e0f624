import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # test helpers: openai_stub, tiny_model

REPO = TESTS.parent
SAMPLES = REPO.parent / "shared" / "data" / "realmedconv_samples"

from tiny_model import keep_float64_in_rmsnorm  # noqa: E402

keep_float64_in_rmsnorm()  # exactness checks run in float64 (see its docstring); float32 is unchanged


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, fixed by the first ``Accelerator()``; a command runs once per process,
    but tests call ``train.main`` many times in one, with different precisions (``mixed_precision`` may not change)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
