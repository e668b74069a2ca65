"""The fault suite's rows for docs/fault-injection.md (tests/fault_table.py writes it at the end of the session)."""

from __future__ import annotations

import pytest

from tests import fault_table

RECORDS: list[dict] = []


@pytest.fixture(scope="session")
def record():
    def add(**row) -> None:
        RECORDS.append(row)

    return add


def pytest_sessionfinish(session, exitstatus):
    fault_table.save(RECORDS)
