"""The ``hespotex`` logger: every message once, with or without the application's logging set up."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = """
import logging, sys
if sys.argv[1] == "basicConfig":
    logging.basicConfig(level=logging.INFO, format="ROOT %(name)s %(levelname)s %(message)s")
import hespotex as hx
logging.getLogger("hespotex").info("first message")
logging.getLogger("hespotex").warning("second message")
hx.settings.verbosity = logging.WARNING
logging.getLogger("hespotex").info("hidden message")
"""


def _run(mode: str) -> list[str]:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True, cwd=REPO
    )
    return (res.stdout + res.stderr).splitlines()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("basicConfig", ["ROOT hespotex INFO first message", "ROOT hespotex WARNING second message"]),
        ("none", ["INFO hespotex: first message", "WARNING hespotex: second message"]),
    ],
)
def test_each_log_line_appears_once(mode, expected):
    """Under logging.basicConfig the root handler shows each record once (the package handler stays silent);
    without any logging set up the package handler shows it once, at INFO; verbosity still filters."""
    lines = _run(mode)
    assert lines == expected


def test_records_still_propagate_to_the_application(caplog):
    """The package does not cut propagation (as propagate=False would): pytest's caplog and log files see it."""
    with caplog.at_level(logging.INFO, logger="hespotex"):
        logging.getLogger("hespotex").info("seen by caplog")
    assert [r.getMessage() for r in caplog.records] == ["seen by caplog"]
