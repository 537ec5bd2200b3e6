"""The graph execution mode (``compile=graphs``): forwards over a static KV cache, one CUDA graph
per fed-length bucket.

A decode step of a small model on a GPU is bound by launching its kernels (hundreds per forward),
not by the arithmetic. Captured once as a CUDA graph, a forward is one launch. That needs static
shapes, so in this mode:

- the stage's ``StageCache`` holds keys and values in fixed buffers of ``capacity`` slots
  (``StageCache(static=...)``); a forward writes its fed slots at the positions in
  ``write_at`` (a device tensor) and attention reads every slot through a full additive mask,
  so slots not yet written are masked, never read;
- the number of tokens fed is padded up to a bucket (1, 2, 4, 8, 16, 32, ...); a padded input
  writes its keys and values into slots after the real ones (masked, and overwritten later) and
  attends causally, so it never produces a non-finite value that a masked product could spread;
- each bucket is captured the first time it is used (after two warm-up runs that write only
  into the last slots), and replayed from then on; filling the static inputs is the only host
  work per forward. The cache's buffers never move while graphs hold them: growing the capacity
  drops the graphs, which are captured again on their next use.

``StaticForward`` runs the same static-shape forward without capture where there is no CUDA
device (``capture=False``): that is what the CPU tests check against eager forwards. With
``compiled=True`` (``compile=compiled``, CPU) each bucket's forward is compiled by inductor with
frozen weights instead -- one graph per bucket, no graph breaks (``fullgraph``), counted in
``compiles``; a causal feed longer than the largest bucket (a prompt) runs in chunks of it, so
prompts of any length reuse the same graphs. Inductor keeps its artefacts under
``<model home>/inductor`` (``$TORCHINDUCTOR_CACHE_DIR`` wins), so a later process loads them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from pyramid_core.backends.hf.cache import StageCache
from pyramid_core.backends.hf.files import model_home

__all__ = ["StaticForward", "bucket_of", "BUCKETS"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Fed lengths a forward is padded to (a longer feed is padded to a multiple of the largest)."""


def bucket_of(m: int) -> int:
    """The smallest bucket holding ``m`` fed tokens."""
    for b in BUCKETS:
        if m <= b:
            return b
    top = BUCKETS[-1]
    return -(-m // top) * top


def _allow_compiles() -> None:
    """Dynamo keeps the graphs of one function together, whichever object they were compiled for:
    every compiled stage of a process (draft, qualifier, target, ...) and each of its buckets
    count against one limit (8 by default). Raise it to what a few chains of stages need."""
    import torch._dynamo.config as dynamo

    # torch < 2.7 names the first limit cache_size_limit (and the second accumulated_cache_size_limit)
    for names, floor in ((("recompile_limit", "cache_size_limit"), 256),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 1024)):
        name = next(n for n in names if hasattr(dynamo, n))
        setattr(dynamo, name, max(int(getattr(dynamo, name)), floor))


class StaticForward:
    """Static-shape forwards of ``model`` over ``cache`` (a static ``StageCache``), captured as
    CUDA graphs per bucket when ``capture`` (module docstring).

    ``__call__(ids, positions, slot, allowed)`` feeds ``ids`` (``Long[Tensor, "m"]``) at
    ``positions``, written to cache slots ``slot .. slot+m-1``; ``allowed``
    (``Bool[Tensor, "m keys"]``, keys = the first slots) says which slots each fed token sees
    (``None``: causal). Returns the logits of every fed token, ``Float[Tensor, "m vocab"]``, and
    the hidden states (a tuple, one per layer, ``Float[Tensor, "1 m hidden"]``) when
    ``hidden_states``.
    """

    def __init__(self, model: Any, cache: StageCache, cache_kw: str, *, capture: bool, hidden_states: bool = False,
                 compiled: bool = False) -> None:
        self.model, self.cache, self.cache_kw = model, cache, cache_kw
        self.capture = capture
        if capture and compiled:
            raise ValueError("a static forward is captured (CUDA graphs) or compiled (inductor), not both")
        self.compiled = compiled
        self.compiles = 0  # graphs inductor compiled so far (a test counts them: none across rounds)
        self._forward: Any = self._run
        if compiled:
            # inductor's artefacts next to the models (not in /tmp): a later process reuses them
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(model_home() / "inductor"))
            _allow_compiles()
            self._forward = torch.compile(self._run, backend=self._inductor, fullgraph=True, dynamic=False)
        self.hidden_states = hidden_states
        self.device: torch.device = model.get_input_embeddings().weight.device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self._graphs: dict[int, tuple[Any, dict[str, Tensor], Any]] = {}
        self._capacity = -1
        self._pool: Any = None
        self.captures = 0  # graphs captured so far (a test counts them: no recapture across rounds)

    def keep_hidden_states(self, flag: bool) -> None:
        """Return the hidden states from now on (or not): captured graphs are captured again."""
        if flag != self.hidden_states:
            self.hidden_states = flag
            self._drop_graphs()

    def _drop_graphs(self) -> None:
        """Forget every captured graph, and their memory pool: a graph is never captured into a
        pool that freed graphs used (the caching allocator refuses that)."""
        self._graphs.clear()
        self._pool = None

    def _inputs(self, b: int) -> dict[str, Tensor]:
        cap = self.cache.capacity
        return {
            "ids": torch.zeros(1, b, dtype=torch.long, device=self.device),
            "pos": torch.zeros(1, b, dtype=torch.long, device=self.device),
            "mask": torch.zeros(1, 1, b, cap, dtype=self.dtype, device=self.device),
            "at": torch.arange(cap - b, cap, dtype=torch.long, device=self.device),
        }

    def _run(self, inputs: dict[str, Tensor]) -> Any:
        self.cache.write_at(inputs["at"])
        kwargs: dict[str, Any] = {self.cache_kw: self.cache.kv, "use_cache": True}
        if self.hidden_states:
            kwargs["output_hidden_states"] = True
        return self.model(input_ids=inputs["ids"], position_ids=inputs["pos"], attention_mask=inputs["mask"], **kwargs)

    def _inductor(self, gm: Any, example_inputs: Any) -> Any:
        """The backend of the compiled mode: inductor with frozen weights (constants folded,
        linears lowered to oneDNN), counted."""
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs, config_patches={"freezing": True})

    def _graph(self, b: int) -> tuple[Any, dict[str, Tensor], Any]:
        """The captured forward of bucket ``b`` (captured now if it is not yet)."""
        if self._capacity != self.cache.capacity:  # new buffers: graphs that point at the old ones go
            self._drop_graphs()
            self._capacity = self.cache.capacity
        entry = self._graphs.get(b)
        if entry is not None:
            return entry
        inputs = self._inputs(b)  # warm-up and capture write only into the last b slots
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(inputs)
        self.captures += 1
        entry = (graph, inputs, out)
        self._graphs[b] = entry
        return entry

    def __call__(self, ids: Tensor, positions: Tensor, slot: int, allowed: Tensor | None = None
                 ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        m, top = int(ids.numel()), BUCKETS[-1]
        if self.compiled and m > top and allowed is None:  # a long causal feed (a prompt): in chunks of
            parts = [self(ids[i:i + top], positions[i:i + top], slot + i) for i in range(0, m, top)]  # one shape
            hidden = None if parts[0][1] is None else tuple(
                torch.cat([p[1][k] for p in parts if p[1] is not None], dim=1) for k in range(len(parts[0][1])))
            return torch.cat([p[0] for p in parts]), hidden
        return self._bucketed(ids, positions, slot, allowed)

    def _bucketed(self, ids: Tensor, positions: Tensor, slot: int, allowed: Tensor | None
                  ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        m = int(ids.numel())
        b = bucket_of(m)
        self.cache.reserve(slot + b)
        cap = self.cache.capacity
        keys = torch.arange(cap)
        rows = torch.arange(slot, slot + b)  # pads attend causally too (finite outputs)
        see = keys.unsqueeze(0) <= rows.unsqueeze(1)
        if allowed is not None:
            see[:m] = False
            see[:m, : allowed.shape[1]] = allowed
        mask = torch.zeros(b, cap, dtype=self.dtype).masked_fill_(~see, torch.finfo(self.dtype).min)
        pad = b - m
        feed = torch.cat([ids.cpu(), ids.new_zeros(pad).cpu()]) if pad else ids.cpu()
        pos = torch.cat([positions.cpu(), positions[-1:].cpu().expand(pad) + 1]) if pad else positions.cpu()
        at = torch.arange(slot, slot + b)
        if self.capture:
            graph, inputs, out = self._graph(b)
            inputs["ids"].copy_(feed.unsqueeze(0), non_blocking=True)
            inputs["pos"].copy_(pos.unsqueeze(0), non_blocking=True)
            inputs["mask"].copy_(mask[None, None], non_blocking=True)
            inputs["at"].copy_(at, non_blocking=True)
            graph.replay()
        else:
            inputs = {"ids": feed.unsqueeze(0).to(self.device), "pos": pos.unsqueeze(0).to(self.device),
                      "mask": mask[None, None].to(self.device), "at": at.to(self.device)}
            out = self._forward(inputs)
        logits: Tensor = out.logits[0, :m].clone()
        hidden = tuple(h[:, :m].clone() for h in out.hidden_states) if self.hidden_states else None
        return logits, hidden
