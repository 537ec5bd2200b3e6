"""The Hugging Face baselines every speedup is measured against: plain ``generate`` of the
target, assisted generation (``assistant_model=``) and prompt-lookup decoding, each timed on
the same prompts and counting the target's forwards. ``pyramid bench`` and
``pyramid generate --compare`` both run them from here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.devices import sync
from pyramid_core.types import SamplingConfig

__all__ = ["BaselineRun", "HF_GENERATE", "HF_GENERATE_COMPILED", "HF_GENERATE_STATIC", "HF_GENERATE_FP32",
           "run_baselines", "versions"]

HF_GENERATE = "HF generate (target)"
HF_GENERATE_COMPILED = "HF generate (target, compiled stage)"
HF_GENERATE_STATIC = "HF generate (static cache + torch.compile)"
HF_GENERATE_FP32 = "HF generate (target, float32 eager)"
"""A reference in another dtype when the target is not float32: never the baseline of a speedup."""


@attrs.frozen
class BaselineRun:
    """One HF decoding mode over the prompts: the new tokens per prompt, the summed wall time,
    the target's forwards; ``note`` says why it did not run (then ``outputs`` is empty)."""

    label: str
    outputs: tuple[tuple[int, ...], ...] = ()
    wall_s: float = 0.0
    target_forwards: int = 0
    note: str = ""
    plain: bool = True  # HF generate of the target alone (not assisted, not prompt lookup)

    @property
    def ran(self) -> bool:
        return not self.note


class _ForwardCounter:
    """Counts forwards of one module (a pre-hook; layer-truncated views of the same model share
    hook dicts, so the module is checked by identity)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        if module is self.module:
            self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def _assistant(model: Any, tokens: int) -> Any:
    """A shallow copy of ``model`` with its own generation config: HF tunes it in place. Drafts
    ``tokens`` tokens per round, constant (HF's default schedule starts at 20 and adapts)."""
    assistant = copy.copy(model)
    assistant.generation_config = copy.deepcopy(model.generation_config)
    assistant.generation_config.num_assistant_tokens = tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    return assistant


def _sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    if sampling.is_greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or None,
            "top_p": sampling.top_p}


def _static_compiled(model: Any) -> Any:
    """A view of ``model`` whose forward is ``torch.compile``d, for generation with a static
    cache -- transformers' documented fast configuration (CUDA graphs on a GPU)."""
    view = copy.copy(model)
    mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    view.forward = torch.compile(model.forward, fullgraph=True, mode=mode)
    return view


def run_baselines(
    target: HFStage,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: SamplingConfig | None = None,
    assistants: Sequence[tuple[str, HFStage, int]] = (),
    prompt_lookup_tokens: int | None = None,
    compiled: bool = False,
    static_compile: bool = False,
    float32_reference: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> list[BaselineRun]:
    """HF ``generate`` of the target alone (first, eager); with ``compiled``, the same over the
    compiled stage's runner (``target.runner``: HF's loop over exactly what a compiled pyramid
    stage runs); with ``static_compile``, with a static cache and a ``torch.compile``d forward
    (every prompt is run once untimed first: each prompt length compiles); then assisted
    generation with each ``(name, stage, tokens per round)`` of ``assistants``, then prompt
    lookup with ``prompt_lookup_tokens`` tokens (``None``: not run); with ``float32_reference`` and
    a target in another dtype, eager HF generate of the same model loaded in float32 (a reference
    across dtypes, not a baseline: ``plain`` is False). Each mode is warmed up on
    the first prompt, then timed prompt by prompt (prompt i seeded with ``seed + i`` when
    sampling). A mode this transformers version (or device) does not support is returned with
    a ``note``."""
    from tqdm import tqdm

    sampling = sampling or SamplingConfig.greedy()
    model = target.model
    device = target.device
    base_kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": stop_ids[0] if stop_ids else 0,
                               **_sampling_kwargs(sampling)}
    if stop_ids:
        base_kw["eos_token_id"] = list(stop_ids)
    # (label, the module generate runs, extra generate kwargs, prompts to warm up on, plain)
    variants: list[tuple[str, Any, dict[str, Any], int, bool]] = [(HF_GENERATE, model, {}, 1, True)]
    if compiled and target.compiled:
        variants.append((HF_GENERATE_COMPILED, target.runner, {}, 1, True))
    if static_compile:
        variants.append((HF_GENERATE_STATIC, _static_compiled(model), {"cache_implementation": "static"},
                         len(prompts), True))
    for name, stage, tokens in assistants:
        variants.append((f"HF assisted ({name}, {tokens})", model,
                         {"assistant_model": _assistant(stage.model, tokens)}, 1, False))
    if prompt_lookup_tokens is not None:
        variants.append((f"HF prompt lookup ({prompt_lookup_tokens})", model,
                         {"prompt_lookup_num_tokens": prompt_lookup_tokens}, 1, False))
    source = str(getattr(model.config, "name_or_path", "") or "")
    if float32_reference and target.dtype != torch.float32 and source and target.model is target.source:
        from pyramid_core.backends.hf.loading import load_model

        try:
            variants.append((HF_GENERATE_FP32, load_model(source, device=device, dtype=torch.float32), {}, 1, False))
        except (OSError, ValueError) as exc:
            runs_note = f"not run: the float32 copy of {source} did not load: {exc}"[:200]
            variants.append((HF_GENERATE_FP32, None, {"note": runs_note}, 0, False))
    runs: list[BaselineRun] = []
    for label, module, extra, warm, plain in tqdm(variants, desc="bench HF", disable=not progress):
        if module is None:
            runs.append(BaselineRun(label, note=extra["note"], plain=plain))
            continue
        counter = _ForwardCounter(module)
        outs: list[tuple[int, ...]] = []
        wall = 0.0
        try:
            with torch.inference_mode():
                for ids in prompts[:warm]:
                    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
                    module.generate(x, attention_mask=torch.ones_like(x), **{**base_kw, "max_new_tokens": 2}, **extra)
                counter.count = 0
                for i, ids in enumerate(prompts):
                    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
                    torch.manual_seed(seed + i)
                    t0 = time.perf_counter()
                    out = module.generate(x, attention_mask=torch.ones_like(x), **base_kw, **extra)
                    sync(device)
                    wall += time.perf_counter() - t0
                    outs.append(tuple(int(t) for t in out[0, len(ids):].tolist()))
        except Exception as exc:  # an unsupported mode of this transformers version: note it
            first = str(exc).splitlines()[0] if str(exc) else ""
            runs.append(BaselineRun(label, note=f"not run: {type(exc).__name__}: {first}"[:200], plain=plain))
            continue
        finally:
            counter.remove()
        runs.append(BaselineRun(label, tuple(outs), wall, counter.count, plain=plain))
    return runs


def versions() -> str:
    """``"transformers X.Y.Z"``, for reports."""
    import transformers

    return f"transformers {transformers.__version__}"
