"""Distillation: building draft and qualifier stages from a target's own weights, offline.

``corpus`` (what the target says, with its next-token distributions), ``train`` (knowledge
distillation of a student), ``evaluate`` (held-out agreement and cost ratios) and ``heads`` (feature heads);
its command is ``pyramid distill`` (``pyramid_core.cli.distill``). It uses the Hugging Face backend (``pyramid_core.backends.hf``: the student
format, model loading); the backend never uses it.
"""
