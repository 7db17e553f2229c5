"""Tests that need something of the machine (root, Slurm daemons) skip loudly on a developer's box
that lacks it, but fail in CI, where the project installs and runs everything it needs."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (CI is set, so this must run here)")
    pytest.skip(reason)
