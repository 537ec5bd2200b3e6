"""``pyramid bench``: pipelines next to Hugging Face decoding on the same prompts (``run``), its
HF rows (``baselines``), the Spec-Bench mode over a question file (``questions``), and what it reports (``report``)."""

from pyramid_core.lab.bench.questions import QUESTION_ROWS, SpecBenchResult, run_specbench
from pyramid_core.lab.bench.report import HF_BASELINE, BenchResult, BenchRow, write_bench
from pyramid_core.lab.bench.run import BenchConfig, default_configs, feature_configs, run_bench

__all__ = ["HF_BASELINE", "QUESTION_ROWS", "BenchConfig", "BenchResult", "BenchRow", "SpecBenchResult",
           "default_configs", "feature_configs", "run_bench", "run_specbench", "write_bench"]
