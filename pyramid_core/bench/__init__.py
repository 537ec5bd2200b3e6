"""``pyramid bench``: pipelines next to Hugging Face decoding on the same prompts (``run``),
and what it reports (``report``)."""

from pyramid_core.bench.report import HF_BASELINE, BenchResult, BenchRow, write_bench
from pyramid_core.bench.run import (
           SPEC_BENCH_ROWS,
           BenchConfig,
           SpecBenchResult,
           default_configs,
           run_bench,
           run_specbench,
)

__all__ = ["HF_BASELINE", "SPEC_BENCH_ROWS", "BenchConfig", "BenchResult", "BenchRow", "SpecBenchResult",
           "default_configs", "run_bench", "run_specbench", "write_bench"]
