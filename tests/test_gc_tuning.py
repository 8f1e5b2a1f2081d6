"""The programs' garbage-collector tuning (supervisors.system.tune_gc), in a process of its own:
the collector's settings are the whole process's, so the test process is left as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisors.system import DEFAULT_GC_THRESHOLD, GC_THRESHOLD_ENV, MAX_GC_THRESHOLD

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import gc, json, logging; logging.basicConfig(); from supervisors.system import tune_gc; "
         "before = gc.get_threshold(); got = tune_gc(); "
         "print(json.dumps([before, gc.get_threshold(), got, gc.get_freeze_count() > 0]))")


def tuned(value: str | None) -> tuple[list[int], list[int], int | None, bool, str]:
    env = {k: v for k, v in os.environ.items() if k != GC_THRESHOLD_ENV}
    if value is not None:
        env[GC_THRESHOLD_ENV] = value
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    before, after, got, frozen = json.loads(done.stdout)
    return before, after, got, frozen, done.stderr


def test_by_default_the_young_generation_is_collected_less_often_and_start_up_is_frozen() -> None:
    before, after, got, frozen, _ = tuned(None)
    assert got == DEFAULT_GC_THRESHOLD and after == [DEFAULT_GC_THRESHOLD, before[1], before[2]]
    assert frozen


def test_the_threshold_is_an_environment_setting_and_zero_leaves_python_alone() -> None:
    assert tuned("5000")[1][0] == 5000
    before, after, got, frozen, _ = tuned("0")
    assert got is None and after == before and not frozen


@pytest.mark.parametrize("bad", ["many", "1e5", "20 000"])
def test_a_threshold_that_is_not_a_number_is_said_and_the_default_used(bad: str) -> None:
    _, after, got, _, stderr = tuned(bad)
    assert got == DEFAULT_GC_THRESHOLD and after[0] == DEFAULT_GC_THRESHOLD
    assert f"{GC_THRESHOLD_ENV}={bad!r} is not a whole number" in stderr


def test_a_threshold_out_of_range_is_said_and_replaced_never_a_crash() -> None:
    """Found in review: 2**31 parsed, then gc.set_threshold raised OverflowError after the system had
    started, outside any handler: the program's main thread died with its actors still running."""
    _, after, got, _, stderr = tuned(str(2**31))
    assert got == MAX_GC_THRESHOLD and after[0] == MAX_GC_THRESHOLD and "is above" in stderr
    _, after, got, _, stderr = tuned("-5")
    assert got == DEFAULT_GC_THRESHOLD and after[0] == DEFAULT_GC_THRESHOLD and "is below 0" in stderr
