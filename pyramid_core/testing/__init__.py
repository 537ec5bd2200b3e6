"""Helpers for testing pipelines and plugins without neural models."""

from pyramid_core.testing.table import TableModel, validate_distribution

__all__ = ["TableModel", "validate_distribution"]
