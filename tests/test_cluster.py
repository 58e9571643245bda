"""``hespotex._cluster``: processes hespotex starts do not inherit dask's ``MALLOC_TRIM_THRESHOLD_``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hespotex._cluster import TRIM_VARIABLE, without_trim_threshold, worker_environ

CODE = f"import os; print(os.environ.get({TRIM_VARIABLE!r}))"


def _child_sees() -> str:
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.strip()


def test_processes_started_inside_do_not_inherit_the_threshold(monkeypatch):
    monkeypatch.setenv(TRIM_VARIABLE, "65536")  # as an earlier dask nanny leaves this process's environment
    with without_trim_threshold():
        inside = _child_sees()
    assert inside == "None"
    assert _child_sees() == "65536" and os.environ[TRIM_VARIABLE] == "65536"  # put back afterwards


def test_the_threshold_is_put_back_after_an_error_and_left_unset_when_it_was(monkeypatch):
    monkeypatch.setenv(TRIM_VARIABLE, "65536")
    with pytest.raises(RuntimeError, match="spawn failed"), without_trim_threshold():
        raise RuntimeError("spawn failed")
    assert os.environ[TRIM_VARIABLE] == "65536"
    monkeypatch.delenv(TRIM_VARIABLE)
    with without_trim_threshold():
        pass
    assert TRIM_VARIABLE not in os.environ


def test_worker_environ_keeps_the_nannys_other_variables():
    import dask
    import distributed  # noqa: F401  (loads distributed's config)

    default = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert TRIM_VARIABLE in default  # what dask sets by default
    env = worker_environ()
    assert TRIM_VARIABLE not in env
    assert env == {k: v for k, v in default.items() if k != TRIM_VARIABLE} and env["OMP_NUM_THREADS"] == 1
