"""The speed figures timing.json and the report give (evaluation/speed.py): each is computed from the calls it
times, on a clock the test drives, so a wrong statistic, unit or count of calls shows as a wrong number."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transferkit.evaluation import speed


@pytest.fixture
def clock(monkeypatch):
    """speed's perf_counter, which only the runners below move forward."""
    now = [0.0]
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_latency_is_the_median_of_the_timed_calls_in_milliseconds(clock):
    calls = {"a": 0, "b": 0}

    def runner(name, seconds):
        def run():
            calls[name] += 1
            clock[0] += seconds(calls[name])
        return run

    # a: 2 ms a call; b: 5 ms, and 100 ms every 7th call (a slow spell the median leaves out, a mean would not)
    got = speed.latency_ms({"a": runner("a", lambda i: 0.002),
                            "b": runner("b", lambda i: 0.1 if i % 7 == 0 else 0.005)}, repeats=25)
    assert got == pytest.approx({"a": 2.0, "b": 5.0}, rel=1e-9)
    # each: 5 warm-up calls, then 3 blocks (10, 10, 5 timed calls) each opened by one untimed call
    assert calls == {"a": 5 + 3 + 25, "b": 5 + 3 + 25}
    assert speed.latency_ms({}, repeats=3) == {}


class _Timed(torch.nn.Module):
    """A model whose forward pass takes `seconds(call)` on the test's clock."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)
        self.clock, self.seconds, self.calls = clock, seconds, 0

    def forward(self, x):
        self.calls += 1
        self.clock[0] += self.seconds(self.calls)
        return self.conv(x)


def test_cpu_latency_and_throughput_time_each_model_as_it_runs(clock):
    # fast: 1 ms at batch 1; 20 ms at batch 8 but for a slow spell in the last round (the best round counts)
    fast = _Timed(clock, lambda i: 0.001)
    slow = _Timed(clock, lambda i: 0.004)
    assert speed.cpu_latency_ms({"fast": fast, "slow": slow}, repeats=12) == pytest.approx(
        {"fast": 1.0, "slow": 4.0}, rel=1e-9)
    fast.seconds, fast.calls = (lambda i: 0.08 if i == 4 else 0.02), 0
    slow.seconds = lambda i: 0.05
    got = speed.cpu_throughput({"fast": fast, "slow": slow}, batch=8, repeats=3)
    assert got == pytest.approx({"fast": 8 / 0.02, "slow": 8 / 0.05}, rel=1e-9)
    assert fast.calls == 1 + 3  # one warm-up, one timed call a round


def test_onnx_throughput_is_the_best_round_of_a_warm_session(clock, monkeypatch):
    """Images per second of each ONNX file at its batch: a new session each round, whose first call (ONNX
    Runtime's set-up, 1 s here) is not timed, and the best of the rounds (a slow spell in one is left out)."""
    from transferkit.deploy import sessions

    made = []

    class Session:
        def __init__(self, path, threads):
            self.path, self.calls = path, 0
            made.append(path.name)

        def get_inputs(self):
            return [SimpleNamespace(name="x")]

        def run(self, outputs, feed):
            self.calls += 1
            assert feed["x"].shape == (8, 3, 32, 32)
            slow_round = self.path.name == "a.onnx" and made.count("a.onnx") == 3  # the last round
            clock[0] += 1.0 if self.calls == 1 else (0.5 if slow_round else {"a.onnx": 0.02, "b.onnx": 0.04}[
                self.path.name])

    monkeypatch.setattr(sessions, "ort_session", Session)
    files = {"a": Path("a.onnx"), "b": Path("b.onnx")}
    assert speed.onnx_throughput(files, batch=8, repeats=3) == pytest.approx({"a": 8 / 0.02, "b": 8 / 0.04}, rel=1e-9)
    assert sorted(made) == ["a.onnx"] * 3 + ["b.onnx"] * 3


def test_other_work_is_the_cpu_time_the_machine_spent_beyond_this_process(clock, monkeypatch):
    """3 busy seconds on the machine, 1 of them this process's, over 2 s: one core's worth of other work."""
    readings = iter([(100.0, 5.0), (103.0, 6.0)])
    monkeypatch.setattr(speed, "busy_seconds", lambda: next(readings))
    load = {}
    with speed.other_work(load):
        clock[0] += 2
    assert load == {"other_cores": 1.0}
    monkeypatch.setattr(speed, "busy_seconds", lambda: None)  # not Linux: nothing said
    with speed.other_work(load := {}):
        pass
    assert load == {}


def test_a_cpu_quota_below_the_cores_it_may_run_on_says_nothing_of_other_work(tmp_path, monkeypatch):
    """`docker --cpus=2` on a 64-core host: /proc/stat's 64 cores hold the neighbours' work, which takes nothing of
    this process's 2 cores' worth. The tightest limit of its cgroup and those above it counts."""
    (tmp_path / "job" / "inner").mkdir(parents=True)
    (tmp_path / "membership").write_text("0::/job/inner\n")
    (tmp_path / "job" / "inner" / "cpu.max").write_text("max 100000\n")
    assert speed.cpu_quota(tmp_path, tmp_path / "membership") is None
    (tmp_path / "job" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert speed.cpu_quota(tmp_path, tmp_path / "membership") == 1.5
    monkeypatch.setattr(speed, "cpu_quota", lambda: 1.5)
    assert speed.busy_seconds() is None or len(os.sched_getaffinity(0)) == 1
    monkeypatch.setattr(speed, "cpu_quota", lambda: None)
    assert speed.busy_seconds() is not None or not Path("/proc/stat").exists()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_other_work_counts_a_busy_process_beside_the_timings():
    import subprocess
    import sys
    import time

    load = {}
    with speed.other_work(load):
        subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 1\nwhile time.time() < end: pass"],
                       check=True)
        time.sleep(0.1)
    assert load["other_cores"] > 0.3, load  # the child's second of one core, its start-up included


def test_results_warn_where_other_work_slowed_the_timings():
    from transferkit.evaluation.formats import busy_note

    assert busy_note({"machine": {"other_cores": 0.1}}) == busy_note({}) == []
    note = busy_note({"machine": {"other_cores": 0.9}})
    assert note == ["While evaluate timed, other processes kept 0.90 of the cores it runs on busy, so the timings may "
                    "be many times slower than this machine gives on its own, and the speed-ups between them off (the "
                    "one-thread timings suffer least). Fix: on an idle machine, running evaluate again as it ran (the "
                    "project's: `uv run dvc repro -s -f evaluate`) times them again."]
    assert busy_note({"machine": {"other_cores": 0.9}}, "export") == [  # by hand too, and with no one-thread timing
        "While export timed, other processes kept 0.90 of the cores it runs on busy, so the timings may be many times "
        "slower than this machine gives on its own, and the speed-ups between them off. Fix: on an idle machine, the "
        "same command times them again."]
