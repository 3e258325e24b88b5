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


@pytest.fixture(scope="session")
def demo_model():
    """The embedded demo chat model (Qwen2.5-Coder-0.5B-Instruct), fp32 on CPU."""
    import refusaldir

    return refusaldir.load_model("demo")


@pytest.fixture(scope="session")
def smollm2_model():
    import refusaldir

    return refusaldir.load_model("smollm2")


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
