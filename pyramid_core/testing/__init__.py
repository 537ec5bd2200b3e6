"""Helpers for testing pipelines and plugins without neural models: ``TableModel`` stages,
injected faults, and the conformance checks a policy author runs on a new rule
(``check_policy_contract``, ``check_policy_lossless``)."""

from pyramid_core.testing.contract import ContractReport, check_policy_contract
from pyramid_core.testing.contract_cases import ContractCase, contract_cases
from pyramid_core.testing.faults import FAULTS, Fault, FaultyStage, InjectedFault, fail_module
from pyramid_core.testing.lossless import (
    DEFAULT_TABLES,
    LosslessCheck,
    LosslessReport,
    check_policy_lossless,
)
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
