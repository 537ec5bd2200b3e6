"""Names in Markdown reports are literal text: a label, a stage spec or a note written into a
report (``md_escape``) renders, with the Markdown package and the ``tables`` extension mkdocs
uses, as exactly that string -- never a link, emphasis, code, HTML or an extra table cell. Each
writer of a Markdown report is checked with a label full of syntax."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from typing import Any

import markdown
import pytest

from pyramid_core.lab.outputs import md_escape

# every character CommonMark / Python-Markdown / GitHub can read as syntax, in the shapes that do
LABEL = (r"a|b [c](d) ![e](f) `g` *h* **i** _j_ __k__ <b>l</b> <http://m.n> &amp; &#126; ~~o~~ \p \\ "
         r"{q} #r !s <t")
TREE = "tree[budget=8,4,top-k](draft)"  # the label that once rendered as a link to "draft"
SYNTAX_TAGS = ("<a", "<em", "<strong", "<code", "<b>", "<img", "<del", "<h1", "<blockquote", "<ol")
# what a label could turn into inside a report (the reports use bold themselves, e.g. **NO**)
LABEL_TAGS = ("<a", "<em", "<code", "<b>", "<img", "<del")


class _Text(HTMLParser):
    """The text of each table cell and list item of a rendered page, and all of its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.all = ""
        self.cells: list[str] = []
        self.items: list[str] = []
        self._into: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("td", "th", "li"):
            self._into = self.items if tag == "li" else self.cells
            self._into.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th", "li"):
            self._into = None

    def handle_data(self, data: str) -> None:
        self.all += data
        if self._into is not None:
            self._into[-1] += data


def render(md: str) -> tuple[str, _Text]:
    page = markdown.markdown(md, extensions=["tables"])
    text = _Text()
    text.feed(page)
    return page, text


@pytest.mark.parametrize("label", [LABEL, TREE, "# heading", "> quote", "1. item", "- item", "+ item",
                                   "stop < 0.4, a & b", "line\nbreak"])
def test_an_escaped_label_renders_as_itself(label: str) -> None:
    literal = " ".join(label.splitlines())
    page, text = render(f"| config | x |\n|---|---|\n| {md_escape(label)} | 1 |\n")
    assert text.cells == ["config", "x", literal, "1"], page
    page, text = render(f"- {md_escape(label)}: a note\n")
    assert text.items == [f"{literal}: a note"], page
    assert not [t for t in SYNTAX_TAGS if t in page], page


def test_unescaped_labels_are_read_as_syntax() -> None:
    """Negative control: the same rendering catches what the escaping prevents."""
    page, text = render(f"| config | x |\n|---|---|\n| {TREE} | 1 |\n")
    assert '<a href="draft">' in page and text.cells[2] != TREE
    page, text = render(f"| config | x |\n|---|---|\n| {LABEL} | 1 |\n")
    assert text.cells[2] == "a" and "<code>" in page and "<em>" in page  # the pipe ended the cell


def check_report(md: str, *labels: str) -> None:
    """``md`` renders each of ``labels`` as the full text of one table cell, and no syntax."""
    page, text = render(md)
    assert not [t for t in LABEL_TAGS if t in page], page
    for label in labels:
        assert label in text.cells, (label, text.cells)


def test_bench_report() -> None:
    from pyramid_core.lab.bench.report import BenchResult, BenchRow

    stages = [{"name": TREE, "forwards": 3, "forward_s": 0.3, "ms_per_forward": 100.0},
              {"name": LABEL, "forwards": 0, "forward_s": 0.0, "ms_per_forward": math.nan}]
    rows = [BenchRow(TREE, "pyramid", tokens=8, wall_s=1.0, target_forwards=4, stages=stages, identical=True),
            BenchRow(LABEL, "pyramid", tokens=8, wall_s=1.0, target_forwards=4, identical=False,
                     mismatched_prompts=["p1"], note=LABEL)]
    result = BenchResult(rows, {"prompts": 1, "max_new_tokens": 8, "device": "cpu", "baseline": TREE})
    md = result.to_markdown()
    check_report(md, TREE, LABEL, f"{TREE} 100.0 / {LABEL} -")
    _, text = render(md)
    assert f"{LABEL}: {LABEL}" in text.items  # the row's note
    assert f"best pipeline of any kind ({TREE}) over the best HF assisted: not measured" in text.all
    assert f"tokens/s over {TREE!r}" in text.all and f"target): {LABEL}: prompts p1" in text.all


def test_spec_bench_report() -> None:
    from pyramid_core.lab.specbench import report_markdown

    cell = {"speedup": 1.0, "tokens_per_s": 1.0, "accept_length": 1.0, "questions": 1.0}
    check_report(report_markdown({TREE: {"qa": cell}, LABEL: {"qa": cell}}, TREE), TREE, LABEL)


def test_plan_report() -> None:
    from pyramid_core.lab.planner import plan_chain

    plan = plan_chain([TREE, LABEL, "target"], [0.001, 0.002, 0.01],
                      [[1.0, 0.6, 0.5], [0.0, 1.0, 0.8], [0.0, 0.0, 1.0]], max_length=4)
    md = plan.to_markdown()
    check_report(md, TREE, LABEL, f"{TREE} → {LABEL} → target")


def test_distill_eval_report() -> None:
    from pyramid_core.cli.distill_eval import eval_markdown

    row = {"agreement_with_target": 0.4, "agreement_with_next": 0.5, "cost_vs_next": 0.1, "ms_per_forward": 2.0,
           "cost_vs_target": 0.05, "by_kind": {LABEL: 0.3}, "by_depth": [0.4, 0.3],
           "by_confidence": [0.1, 0.2, 0.3, 0.4, 0.5]}
    check_report(eval_markdown({"stages": [TREE], "results": [row]}), TREE, LABEL)
