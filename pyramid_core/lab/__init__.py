"""What researchers measure with, built on the core and the backends: stage costs and acceptance
(``measure``), the latency model (``latency``) and planner (``planner``), threshold sweeps
(``sweep``), the benchmark (``bench``), Spec-Bench files (``specbench``), distillation of drafts
(``distill``), the shipped prompts (``prompts``) and results files (``outputs``)."""
