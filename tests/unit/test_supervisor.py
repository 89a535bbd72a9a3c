"""The pure logic of `dispatcher run --processes N`: the setting, restarts, exit codes, and
merging the children's /metrics and health checks. No process is started but one that
fails at once on a bad setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.errors import ConfigurationError, DatabaseUnavailable, DispatcherError
from dispatcher.metrics import Metrics
from dispatcher.settings import (
    MAX_PROCESSES,
    Settings,
    SettingsError,
    available_cpus,
    parse_processes,
)
from dispatcher.supervisor import (
    CRASH_LOOP_EXITS,
    STABLE_AFTER,
    RestartPolicy,
    describe_exit,
    failure,
    merge_checks,
    merge_metrics,
)

DISPATCHER = [sys.executable, "-m", "dispatcher"]


def test_processes_setting_takes_a_number_or_auto() -> None:
    """DISPATCHER_PROCESSES is 1 by default, a number, or auto: the CPUs available."""
    assert Settings.from_env({}).processes == 1
    assert Settings.from_env({"DISPATCHER_PROCESSES": " 4 "}).processes == 4
    assert parse_processes("AUTO", cpus=lambda: 6) == 6
    assert parse_processes("auto", cpus=lambda: 1000) == MAX_PROCESSES
    assert Settings.from_env({"DISPATCHER_PROCESSES": "auto"}).processes >= 1


@pytest.mark.parametrize("raw", ["0", "-1", "two", "", "1.5", str(MAX_PROCESSES + 1)])
def test_a_bad_processes_setting_names_the_variable(raw: str) -> None:
    """A bad value stops the start with a message naming DISPATCHER_PROCESSES."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DISPATCHER_PROCESSES": raw})
    assert str(caught.value) == (
        f"DISPATCHER_PROCESSES: expected auto or an integer from 1 to {MAX_PROCESSES}, got {raw!r}"
    )


def test_available_cpus_respects_affinity_and_a_cgroup_quota() -> None:
    """auto counts the CPUs the process may run on, capped by a CPU quota (rounded up)."""
    assert available_cpus(affinity=None, cpu_count=None) == 1
    assert available_cpus(affinity=2, cpu_count=64, cpu_max="max 100000\n") == 2
    assert available_cpus(affinity=16, cpu_count=16, cpu_max="50000 100000") == 1
    assert available_cpus(affinity=16, cpu_count=16, cpu_max="150000 100000") == 2
    assert available_cpus(affinity=4, cpu_count=4, cpu_max="garbage") == 4


def test_bad_processes_on_the_command_line_exits_2_with_one_line() -> None:
    """`dispatcher run` refuses DISPATCHER_PROCESSES=zero with one line, exit code 2."""
    env = {**os.environ, "DISPATCHER_PROCESSES": "zero"}
    result = subprocess.run(  # noqa: S603 - our own command
        [*DISPATCHER, "run"], env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "dispatcher: configuration error: DISPATCHER_PROCESSES: expected auto or an integer "
        f"from 1 to {MAX_PROCESSES}, got 'zero'"
    ]


def test_restart_backoff_doubles_resets_when_stable_and_gives_up_on_a_crash_loop() -> None:
    """Restarts wait 0.5, 1, 2 s...; a child that ran long starts over; too many exits
    within the window are a crash loop."""
    policy = RestartPolicy(limit=3, window=10.0)
    assert policy.after_exit(at=0.0, uptime=1.0) == 0.5
    assert policy.after_exit(at=1.0, uptime=1.0) == 1.0
    assert policy.after_exit(at=20.0, uptime=STABLE_AFTER) == 0.5  # the first exit aged out
    assert policy.after_exit(at=21.0, uptime=1.0) == 1.0
    assert policy.after_exit(at=22.0, uptime=1.0) is None  # 3 within 10 s
    default = RestartPolicy()
    delays = [default.after_exit(at=float(t), uptime=0.1) for t in range(CRASH_LOOP_EXITS)]
    assert delays[:-1] == [0.5, 1.0, 2.0, 4.0][: CRASH_LOOP_EXITS - 1] and delays[-1] is None


def test_giving_up_on_a_child_keeps_the_meaning_of_its_exit_code() -> None:
    """The supervisor fails with the family of its child's exit code (2, 3, 4 or 1)."""
    assert isinstance(failure(1, 2, "cannot start"), ConfigurationError)
    assert isinstance(failure(1, 3, "crash loop"), DatabaseUnavailable)
    other = failure(0, -9, "exited 5 times within 120 s")
    assert type(other) is DispatcherError
    assert str(other) == (
        "process 0 of dispatcher run --processes exited 5 times within 120 s "
        "(last: killed by SIGKILL); its process=0 log lines above say why"
    )
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-15) == "killed by SIGTERM"


def test_merged_metrics_label_each_process_and_keep_every_type() -> None:
    """Two children's pages become one: each family once with its type, every sample
    labelled with its process, histograms whole, unsampled families still typed."""
    a, b = Metrics(), Metrics()
    a.observe("200", 12.0)
    b.observe("200", 30.0)
    b.observe("5xx", 5.0)
    a.consumer_lag.labels("dispatch", "events", "0").set(4)
    page = merge_metrics([("0", generate_latest(a.registry).decode()),
                          ("1", generate_latest(b.registry).decode())])  # fmt: skip
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    own = {f.name: f for f in text_string_to_metric_families(generate_latest(a.registry).decode())}
    assert {n: f.type for n, f in families.items()} == {n: f.type for n, f in own.items()}
    samples = [(s.name, s.labels, s.value) for s in families["webhook_deliveries"].samples]
    assert ("webhook_deliveries_total", {"outcome": "200", "process": "0"}, 1.0) in samples
    assert ("webhook_deliveries_total", {"outcome": "5xx", "process": "1"}, 1.0) in samples
    counts = {
        s.labels["process"]: s.value
        for s in families["webhook_delivery_duration_seconds"].samples
        if s.name == "webhook_delivery_duration_seconds_count"
    }
    assert counts == {"0": 1.0, "1": 2.0}
    lag = families["webhook_consumer_lag"].samples
    assert [(s.labels, s.value) for s in lag] == [
        ({"consumer": "dispatch", "topic": "events", "partition": "0", "process": "0"}, 4.0)
    ]
    assert page.count(b"# TYPE webhook_consumer_lag gauge") == 1
    assert all("process" in s.labels for f in families.values() for s in f.samples)


def test_merged_checks_name_the_failing_processes() -> None:
    """Ready only when every child answered ok; each failing check names its process."""
    ok = {"cache": "ok", "kafka": "ok", "database": "ok"}
    assert merge_checks({"0": ok, "1": ok}, stopping=False) == {"processes": "ok", **ok}
    merged = merge_checks(
        {"0": {**ok, "kafka": "unreachable"}, "1": {**ok, "kafka": "not assigned: dispatch"},
         "2": None},
        stopping=True,
    )  # fmt: skip
    assert merged == {
        "shutdown": "stopping",
        "processes": "not running or not answering: 2",
        "cache": "ok",
        "kafka": "process 0: unreachable; process 1: not assigned: dispatch",
        "database": "ok",
    }
