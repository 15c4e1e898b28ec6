"""Optional test dependencies: skipped where they are missing on a developer's machine, required
in CI (.ci/run sets CI=1 and installs them), so a test CI must run cannot quietly skip there."""

import importlib
import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def need(module: str):
    """The module, or a skip outside CI; in CI a missing module fails the test."""
    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module)


def need_program(*names: str) -> str:
    """The path of the first of `names` on PATH, or a skip outside CI (a failure in CI)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"none of {', '.join(names)} is installed (Debian: apt-get install -y {names[0]})"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
