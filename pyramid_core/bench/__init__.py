"""``pyramid bench``: pipelines next to Hugging Face decoding on the same prompts (``run``), its
HF rows (``baselines``), the Spec-Bench mode (``specbench``), and what it reports (``report``)."""

from pyramid_core.bench.report import HF_BASELINE, BenchResult, BenchRow, write_bench
from pyramid_core.bench.run import BenchConfig, default_configs, feature_configs, run_bench
from pyramid_core.bench.specbench import SPEC_BENCH_ROWS, SpecBenchResult, run_specbench

__all__ = ["HF_BASELINE", "SPEC_BENCH_ROWS", "BenchConfig", "BenchResult", "BenchRow", "SpecBenchResult",
           "default_configs", "feature_configs", "run_bench", "run_specbench", "write_bench"]
