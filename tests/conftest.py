"""Shared fixtures. Real models are loaded once per test session (integration tests)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)

# REFUSALDIR_TEST_DEVICE / REFUSALDIR_TEST_DTYPE run the unit suite's tiny models on another
# device or dtype (e.g. `REFUSALDIR_TEST_DEVICE=cuda`, `REFUSALDIR_TEST_DTYPE=bfloat16`). Every
# model the tests build or load lands there: tiny.make_chat_model moves its model, and
# load_model's default device follows $REFUSALDIR_DEVICE. Without them everything is CPU fp32,
# also on a machine that has a GPU.
TEST_DEVICE = os.environ.get("REFUSALDIR_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("REFUSALDIR_TEST_DTYPE", "float32")
os.environ["REFUSALDIR_DEVICE"] = TEST_DEVICE
os.environ["REFUSALDIR_DTYPE"] = TEST_DTYPE


def pytest_report_header(config):
    return f"refusaldir test device: {TEST_DEVICE}, dtype: {TEST_DTYPE}"


@pytest.fixture(scope="session")
def demo_model():
    """The embedded demo chat model (Qwen2.5-Coder-0.5B-Instruct), fp32 on CPU."""
    import refusaldir

    return refusaldir.load_model("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_model():
    import refusaldir

    return refusaldir.load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def demo_directions(demo_model, tmp_path_factory):
    """Directions extracted from the demo model on the shipped train splits (saved + reloaded)."""
    import refusaldir

    harmful = refusaldir.load_prompts("harmful", "train")
    harmless = refusaldir.load_prompts("harmless", "train")
    ds = refusaldir.extract(demo_model, harmful, harmless, progress=False)
    folder = ds.save(tmp_path_factory.mktemp("demo_run"))
    return refusaldir.DirectionSet.load(folder)


@pytest.fixture
def tiny_qwen():
    from tiny import make_chat_model

    return make_chat_model("qwen2", "chatml")


@pytest.fixture
def tiny_llama():
    from tiny import make_chat_model

    return make_chat_model("llama", "llama3")


@pytest.fixture
def tol():
    """Tolerance scaled to the test dtype: ``tol(1e-5)`` is 1e-5 in float32, looser in bf16/fp16."""
    from tiny import dtype_tolerance

    return dtype_tolerance


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Unit tests run tiny random models: the default judge (``probe:coder-1.5b``) would load
    a 1.5B judge model to read its residual stream, so they use the model-free phrase judge
    (set before any fixture of the test, module-scoped ones included). Integration tests use
    the probe on the demo model they already hold (``probe``: the same judge code, one model
    instead of two on 2 CPU cores); test_integration_probe_judge.py runs the default itself."""
    import refusaldir.judges.factory as factory

    factory.DEFAULT_JUDGE = "probe" if item.get_closest_marker("integration") else "phrase"
