"""The bench's CPU accounting by process, which says who used the cores while (b) ran."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import backfill_bench


def test_groups_the_driver_its_jvm_and_the_jvms_python_workers() -> None:
    me = 100
    table = {
        1: (0, "init", 50.0),  # not ours
        me: (1, "python", 4.0),
        101: (me, "bash", 0.5),  # spark-submit's launcher shell: neither group
        102: (101, "java", 20.0),
        103: (102, "python3", 1.0),  # the PySpark daemon
        104: (103, "python3", 30.0),  # its forked workers
        105: (103, "python3", 31.0),
        106: (1, "python3", 99.0),  # someone else's worker
    }
    got = backfill_bench.group_cpu(table, me)
    assert got == {"driver python (this process)": 4.0, "jvm": 20.0, "python workers": 62.0}


def test_reads_this_process_from_proc() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc")
    sum(i * i for i in range(300_000))  # burn a little CPU so the count is above zero
    table = backfill_bench._proc_table()
    ppid, _, secs = table[os.getpid()]
    assert ppid == os.getppid()
    assert secs > 0
    # Whatever else runs (a session-wide Spark fixture's JVM may be this process's child), the
    # driver's figure is this process's own.
    groups = backfill_bench.cpu_by_group()
    assert set(groups) == {"driver python (this process)", "jvm", "python workers"}
    assert groups["driver python (this process)"] >= secs
    assert all(v >= 0 for v in groups.values())


def test_a_window_is_the_difference_between_the_nearest_samples() -> None:
    sampler = backfill_bench.CpuSampler()
    sampler.samples = [
        (10.0, {"jvm": 1.0, "python workers": 0.0}),
        (10.5, {"jvm": 1.5, "python workers": 1.0}),
        (11.0, {"jvm": 1.6, "python workers": 2.0}),
    ]
    assert sampler.window(10.45, 11.2) == {"jvm": 0.1, "python workers": 1.0, "wall": 0.5}


def test_a_reaped_childs_time_stays_in_the_table() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc")
    import subprocess
    import sys

    before = backfill_bench._proc_table()[os.getpid()][2]
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    after = backfill_bench._proc_table()[os.getpid()][2]
    assert after - before >= 0.05  # the child's ~0.1-0.3 s now counts under this process
