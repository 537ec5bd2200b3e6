"""Shared fixtures. Models are built lazily (only by tests that ask for them) and once per session."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

# tests/in_vllm/ runs pyramid inside vLLM (``nox -s vllm``); vLLM is no dependency of pyramid, so
# the README's test command, in an environment without it, does not collect that folder
# (a module with a file: a folder named vllm on sys.path would be a namespace package, no vLLM)
_VLLM = importlib.util.find_spec("vllm")
collect_ignore = [] if _VLLM is not None and _VLLM.origin is not None else ["in_vllm"]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Any]:
    """Random Llama models sharing a 64-token vocabulary (pyramid_core.backends.hf.tiny):
    ``target``; ``near``, the target with 5% weight noise (a draft that is often right);
    ``far``, an unrelated model (a draft that is almost always wrong)."""
    from pyramid_core.backends.hf.tiny import perturbed, tiny_llama

    target = tiny_llama(0)
    return {"target": target, "near": perturbed(target, seed=1, scale=0.05), "far": tiny_llama(2)}


@pytest.fixture(scope="session", autouse=True)
def _mode_choices(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``compile=auto`` keeps the modes it measures in a file (backends.hf.choice): the suite keeps
    its own, never the user's."""
    import os

    from pyramid_core.backends.hf.choice import CHOICE_ENV

    before = os.environ.get(CHOICE_ENV)
    os.environ[CHOICE_ENV] = str(tmp_path_factory.mktemp("choices") / "modes.json")
    yield
    if before is None:
        os.environ.pop(CHOICE_ENV, None)
    else:
        os.environ[CHOICE_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Any:
    """The suite runs tiny tensors and small models: one thread is faster than two on a
    two-core machine and avoids oversubscription when the machine is busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
