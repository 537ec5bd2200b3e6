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
from pyramid_core.testing.faults import FAULTS, Fault, FaultyStage, InjectedFault, fail_module
from pyramid_core.testing.table import TableModel, validate_distribution

__all__ = [
    "DEFAULT_TABLES",
    "FAULTS",
    "Fault",
    "FaultyStage",
    "InjectedFault",
    "ContractCase",
    "ContractReport",
    "LosslessCheck",
    "LosslessReport",
    "TableModel",
    "check_policy_contract",
    "check_policy_lossless",
    "contract_cases",
    "fail_module",
    "validate_distribution",
]
