"""Package versions come from installed metadata."""

from __future__ import annotations

import importlib.metadata

from finetune.system.packages import package_version


def test_an_installed_package_reports_its_metadata_version():
    assert package_version("numpy") == importlib.metadata.version("numpy")


def test_an_absent_package_has_no_version():
    assert package_version("surely-not-installed-pkg-xyz") is None
