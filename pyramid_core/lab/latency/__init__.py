"""The [latency model](../../algorithms.md#latency-model): closed forms for planning and for comparing
predicted with measured speedups (``pyramid bench``). Pure maths: nothing here runs a stage
(measuring is ``pyramid_core.lab.measure``).

- ``forms``:   closed forms of the papers (tokens per verification, speedups, throughputs) and
               the i.i.d. alpha that explains measured counts (references there);
- ``cost``:    ``ForwardCost``, a stage's forward time T(M) as a function of the tokens it feeds;
- ``chain``:   ``predict_chain`` and its ``Prediction``, steady state or finite horizon;
- ``horizon``: the finite-horizon expectation under the pipeline's budget rule.

The i.i.d. assumption
---------------------
Every prediction here treats the acceptance of each drafted token at boundary k -> k+1 as an
independent coin with the same probability alpha_k (for exact rejection sampling, alpha =
E[1 - TV(p, q)] = E[sum_x min(p(x), q(x))], Leviathan et al. Sec. 3.1). Real text violates
this (easy and hard stretches cluster), so predictions are first-order estimates; they are
exact for stages with context-free tables (``pyramid_core.testing.TableModel``).
"""

from pyramid_core.lab.latency.chain import Prediction, predict_chain
from pyramid_core.lab.latency.cost import ForwardCost, as_forward_cost
from pyramid_core.lab.latency.forms import (
    expected_tokens,
    iid_alpha,
    pair_speedup,
    polybasic_time,
    psd_throughput,
    sd_throughput,
)

__all__ = [
    "expected_tokens",
    "pair_speedup",
    "sd_throughput",
    "psd_throughput",
    "polybasic_time",
    "ForwardCost",
    "as_forward_cost",
    "Prediction",
    "predict_chain",
    "iid_alpha",
]
