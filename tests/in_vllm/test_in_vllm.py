"""pyramid inside vLLM itself (``nox -s vllm``: an environment with vLLM's build for this machine
and pyramid-core). The README's test command does not collect this folder: vLLM is not one of
pyramid's dependencies (tests/conftest.py ignores it where vLLM is not installed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def test_a_pyramid_chain_as_vllms_proposer_keeps_vllms_greedy_output(tmp_path: Path) -> None:
    """draft -> qualifier (a lossy rule between them) below SmolLM2, blocks of fixed length: every
    request's greedy output equals vLLM plain's at concurrency 1 and 4, vLLM accepts drafted
    tokens, and what the proposer read of vLLM's verdicts from the token table agrees with vLLM's
    own counters."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "pyramid_core.serving.bench", "--out", str(out), "--prompts", "4", "--tokens", "32",
           "--concurrency", "1", "4", "--methods", "plain", "pyramid-fixed", "--stage", "smollm2:stage=draft",
           "--stage", "smollm2:stage=qualifier", "--policy", "fuzzy:tau=0.3", "--length", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "vllm-bench.json").read_text())
    pyramid = next(r for r in result["results"] if r["method"] == "pyramid-fixed")
    for row in pyramid["by_concurrency"].values():
        assert row["accept_length"] is not None and row["accept_length"] > 1.0
        # the verdicts of every step but a request's last, read from the rows' growth
        verdicts = row["planner"]["verdicts"]
        assert verdicts["blocks"] > 0 and set(row["planner"]["chosen"]) == {"4"}
        assert abs(1 + verdicts["accepted"] / verdicts["blocks"] - row["accept_length"]) < 0.25
    assert "| pyramid-fixed | 4 |" in (out / "vllm-bench.md").read_text()


def test_a_lookup_in_front_of_the_chain_inside_vllm(tmp_path: Path) -> None:
    """Prompt lookup asked first for every row, the draft drafting where the planner prefers it:
    greedy outputs equal vLLM plain's at concurrency 1 and 4 (the bench exits non-zero
    otherwise), and vLLM verified blocks of both kinds. Both engines loaded at once, their passes
    alternated (``--interleave``): each one's counters are its own (plain verified nothing)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "pyramid_core.serving.bench", "--out", str(out), "--prompts", "4", "--tokens", "32",
           "--concurrency", "1", "4", "--methods", "plain", "pyramid", "--stage", "smollm2:stage=draft",
           "--lookup", "ngram", "--interleave", "--repeat", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "vllm-bench.json").read_text())
    assert result["chain"]["lookup"] == "ngram"
    pyramid = next(r for r in result["results"] if r["method"] == "pyramid")
    verdicts = pyramid["by_concurrency"]["1"]["planner"]["verdicts"]
    assert 0 < verdicts["lookup blocks"] < verdicts["blocks"], verdicts
    plain = next(r for r in result["results"] if r["method"] == "plain")
    assert all(row["accept_length"] is None and len(row["tokens_per_s_passes"]) == 2
               for row in plain["by_concurrency"].values())
    assert all(row["accept_length"] is not None for row in pyramid["by_concurrency"].values())


def test_an_exported_eagle3_head_runs_on_vllms_eagle3_path(tmp_path: Path) -> None:
    """A pyramid EAGLE-3 head on SmolLM2 (seeded, untrained: this checks the format, not the
    head), exported by ``export_speculators``: vLLM loads it, keeps plain's greedy outputs, and
    the bench measures the same head in pyramid on the same prompts."""
    import torch

    from pyramid_core.backends.hf.files import smollm2_dir
    from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig
    from pyramid_core.backends.hf.loading import load_model
    from pyramid_core.backends.hf.speculators import export_speculators

    base = load_model(smollm2_dir(), dtype="float32")
    torch.manual_seed(0)
    head = FeatureHead(base, FeatureHeadConfig(layers=(1, 14, 26), variant="eagle3"))
    folder = export_speculators(head, tmp_path / "eagle3", verifier=str(smollm2_dir()), base="smollm2", k=3)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "pyramid_core.serving.bench", "--out", str(out), "--prompts", "3", "--tokens", "24",
           "--concurrency", "1", "3", "--methods", "plain", "head", "--head", str(folder), "-k", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "vllm-bench.json").read_text())
    assert result["head_in_pyramid"]["verifications"] > 0
    head_rows = next(r for r in result["results"] if r["method"] == "head")
    assert all(row["accept_length"] is not None for row in head_rows["by_concurrency"].values())
    assert "in vLLM, concurrency 3" in (out / "vllm-bench.md").read_text()


def test_pyramid_serve_answers_openai_requests(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    cmd = [sys.executable, "-m", "pyramid_core.cli", "serve", "--stage", "smollm2:stage=draft", "--stage", "smollm2",
           "--vllm-python", sys.executable, "--port", "0", "--dtype", "float32", "--max-num-seqs", "4",
           "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"at (http://\S+)/v1", line)
        assert url, line
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url.group(1) + "/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        body = json.dumps({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 16,
                           "temperature": 0}).encode()
        request = urllib.request.Request(url.group(1) + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["text"].strip()
        assert "Loaded custom proposer class 'pyramid_core.serving.proposer.PyramidProposer'" in log.read_text()
    finally:
        os.killpg(proc.pid, 2)
        proc.wait(timeout=120)
    assert proc.returncode == 130  # Ctrl-C: the server stopped with it
