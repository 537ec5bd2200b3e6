"""``pyramid bench``: pipelines next to Hugging Face decoding on the same prompts (``run``),
and what it reports (``report``)."""

from pyramid_core.bench.report import HF_BASELINE, BenchResult, BenchRow, write_bench
from pyramid_core.bench.run import BenchConfig, default_configs, run_bench

__all__ = ["HF_BASELINE", "BenchConfig", "BenchResult", "BenchRow", "default_configs", "run_bench", "write_bench"]
