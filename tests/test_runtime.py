"""pdiff.runtime: the command line's allocator setting keeps freed blocks in the process."""
import subprocess
import sys
import textwrap

import pytest

from pdiff import runtime

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from pdiff.runtime import tune_allocator
    tuned = tune_allocator() if sys.argv[1] == "tune" else False
    for _ in range(3):  # 64 MiB: above glibc's largest adaptive mmap threshold
        torch.empty(16 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(16 << 20).fill_(1.0)
    print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def probe(mode: str, env: dict | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    """Ten 64 MiB allocations (after three to warm up) fault in every page (16384 x 4 KiB each)
    under glibc's defaults, and on average over three processes less than half as many once the
    allocator is tuned (the freed block is reused; measured: 0 to 3 of the ten allocations fault)."""
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("PDIFF_NO_MALLOPT", None)
    tuned, faults = probe("tune", env)
    if not tuned:
        pytest.skip("no glibc mallopt here")
    _, default_faults = probe("plain", env)
    assert default_faults > 10 * 16384 // 2
    assert faults < default_faults / 2


@pytest.mark.parametrize("variable", ["MALLOC_ARENA_MAX", "PDIFF_NO_MALLOPT"])
def test_user_settings_win(monkeypatch, variable):
    monkeypatch.setattr(runtime, "_tuned", False)
    monkeypatch.setenv(variable, "2")
    assert runtime.tune_allocator() is False and runtime.allocator_tuned() is False


# -- threads ---------------------------------------------------------------------------------

@pytest.fixture
def threads(monkeypatch, tmp_path):
    """torch's thread count faked (the test process keeps its own), no OMP_NUM_THREADS, no cgroup
    quota files, 2 cores by affinity out of 64."""
    import os

    import torch
    state = {"n": 7}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.__setitem__("n", n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(runtime, "_threads", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("CGROUP_CPU_MAX", "CGROUP_V1_QUOTA", "CGROUP_V1_PERIOD"):
        monkeypatch.setattr(runtime, name, tmp_path / name)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    return state


def test_threads_follow_the_affinity_mask(threads):
    assert runtime.available_cores() == 2
    assert runtime.set_threads() == 2 and threads["n"] == 2
    assert runtime.threads_note() == "using 2 threads (of 2 cores available)"


def test_threads_without_an_affinity_call_use_the_cpu_count(threads, monkeypatch):
    import os
    monkeypatch.delattr(os, "sched_getaffinity")
    assert runtime.set_threads() == 64 and threads["n"] == 64


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("4,2", 4), ("0", 2),
                                             ("many", 2), ("", 2)])
def test_threads_honour_omp_num_threads(threads, monkeypatch, value, expected):
    """A positive OMP_NUM_THREADS (the outer level of a nested list) wins over the cores; one that
    is not a thread count is ignored."""
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert runtime.set_threads() == expected and threads["n"] == expected
    note = runtime.threads_note()
    assert note.endswith("of 2 cores available)")
    assert (f"OMP_NUM_THREADS={value}" in note) == (value in ("1", "3", "4,2"))


def test_a_request_wins(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.set_threads(5) == 5 and threads["n"] == 5
    assert runtime.threads_note() == "using 5 threads (as requested; of 2 cores available)"
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            runtime.set_threads(bad)
    assert threads["n"] == 5


@pytest.mark.parametrize("files, cores", [
    ({"CGROUP_CPU_MAX": "150000 100000\n"}, 2),   # 1.5 cores: rounded up
    ({"CGROUP_CPU_MAX": "50000 100000\n"}, 1),
    ({"CGROUP_CPU_MAX": "max 100000\n"}, 8),      # no quota
    ({"CGROUP_V1_QUOTA": "300000\n", "CGROUP_V1_PERIOD": "100000\n"}, 3),
    ({"CGROUP_V1_QUOTA": "-1\n", "CGROUP_V1_PERIOD": "100000\n"}, 8),
    ({"CGROUP_CPU_MAX": "garbled"}, 8),
])
def test_a_cgroup_quota_caps_the_cores(threads, monkeypatch, files, cores):
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for name, text in files.items():
        getattr(runtime, name).write_text(text)
    assert runtime.available_cores() == cores
    assert runtime.set_threads() == cores


def test_the_note_before_and_after_another_setting(threads):
    assert runtime.threads_note() == "using 7 threads (torch's default; of 2 cores available)"
    runtime.set_threads(1)
    threads["n"] = 3  # torch.set_num_threads called elsewhere
    assert runtime.threads_note() == "using 3 threads (set elsewhere; of 2 cores available)"


@pytest.mark.parametrize("load, threads_, warned", [(0.2, 2, False), (1.0, 2, True),
                                                     (4.0, 2, True), (4.0, 1, False)])
def test_the_note_says_when_other_jobs_hold_the_cores(threads, monkeypatch, load, threads_,
                                                      warned):
    """Two threads on 2 cores with another job's worth of load or more: the note says so; one
    thread never needs the warning."""
    import os
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    runtime.set_threads(threads_)
    note = runtime.threads_note()
    assert note.startswith(f"using {threads_} thread")
    assert (f"the load average is {load:.1f}" in note) == warned
