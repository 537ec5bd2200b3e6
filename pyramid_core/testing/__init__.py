"""Helpers for testing pipelines and plugins without neural models."""

from pyramid_core.testing.conformance import (
    DEFAULT_TABLES,
    ContractCase,
    ContractReport,
    LosslessCheck,
    LosslessReport,
    check_policy_contract,
    check_policy_lossless,
    contract_cases,
)
from pyramid_core.testing.table import TableModel, validate_distribution

__all__ = [
    "DEFAULT_TABLES",
    "ContractCase",
    "ContractReport",
    "LosslessCheck",
    "LosslessReport",
    "TableModel",
    "check_policy_contract",
    "check_policy_lossless",
    "contract_cases",
    "validate_distribution",
]
