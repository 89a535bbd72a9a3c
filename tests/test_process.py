"""The `dispatcher` process as operators run it: signals, crashes, bad settings, logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from dispatcher.settings import Settings, env_name
from dispatcher.store import Principal, Store
from tests.conftest import WAIT, Receiver, free_port, hanging_until, make_event, produce, subscribe

DISPATCHER = [sys.executable, "-m", "dispatcher"]


def environment(settings: Settings) -> dict[str, str]:
    """The DISPATCHER_* variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    values: dict[str, Any] = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "database_url": settings.database_url,
        "http_port": free_port(),
        "event_topics": ",".join(settings.event_topics),
        "consumer_group": settings.consumer_group,
        "retry_topic": settings.retry_topic,
        "notice_topic": settings.notice_topic,
        "dead_letter_topic": settings.dead_letter_topic,
        "allow_private_targets": "127.0.0.0/8,::1/128",
        "tls_ca_file": settings.tls_ca_file,
        "drain_timeout_seconds": settings.drain_timeout_seconds,
        "log_format": "json",
    }
    env.update({env_name(k): str(v) for k, v in values.items()})
    return env


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_bytes().splitlines():
            out.append(orjson.loads(raw))  # every stdout line is one JSON object
        return out

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
            while True:
                assert self.popen.poll() is None, self.log_path.read_text()
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)  # polling readiness with a deadline

    async def wait_exit(self) -> int:
        async with asyncio.timeout(WAIT):
            while self.popen.poll() is None:
                await asyncio.sleep(0.05)  # polling the child's exit with a deadline
        return self.popen.returncode


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, str]], Awaitable[Process]]]:
    started: list[Process] = []

    async def start(env: dict[str, str]) -> Process:
        log_path = tmp_path / f"daemon-{len(started)}.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen([*DISPATCHER, "run"], env=env, stdout=out, stderr=out)  # noqa: S603 - our own command
        process = Process(popen, int(env["DISPATCHER_HTTP_PORT"]), log_path)
        started.append(process)
        await process.wait_ready()
        return process

    yield start
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


def test_bad_setting_exits_non_zero_with_one_clear_line() -> None:
    """DISPATCHER_HTTP_PORT=abc stops the process at start with one line naming it."""
    env = {**os.environ, "DISPATCHER_HTTP_PORT": "abc"}
    result = subprocess.run(  # noqa: S603 - our own command
        [*DISPATCHER, "run"], env=env, capture_output=True, timeout=WAIT, check=False
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "dispatcher: configuration error: DISPATCHER_HTTP_PORT: "
        "expected an integer from 1 to 65535, got 'abc'"
    ]


async def test_sigterm_drains_and_exits_zero_with_json_logs(
    isolated_settings: Settings,
    spawn: Callable[[dict[str, str]], Awaitable[Process]],
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """SIGTERM lets deliveries in flight finish, then the process exits 0; logs are JSON."""
    release = asyncio.Event()
    receiver.responder = hanging_until(release)
    await subscribe(store, shop, receiver, "sales", "CLOSED")
    process = await spawn(environment(isolated_settings))
    await produce(producer, isolated_settings.event_topics[0], make_event(shop))
    await receiver.wait_for(1)  # the delivery is in flight, held by the receiver
    process.popen.send_signal(signal.SIGTERM)
    release.set()
    assert await process.wait_exit() == 0
    events = [line["event"] for line in process.lines()]
    assert "daemon_started" in events and events[-1] == "daemon_stopped"
    delivered = [line for line in process.lines() if line["event"] == "delivery"]
    assert [d["outcome"] for d in delivered] == ["delivered"]


async def test_sigkill_mid_stream_then_restart_loses_no_event(
    isolated_settings: Settings,
    spawn: Callable[[dict[str, str]], Awaitable[Process]],
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """Killed with SIGKILL mid-stream and restarted, the daemon delivers every event."""
    await subscribe(store, shop, receiver, "sales", "CLOSED")
    env = environment(isolated_settings)
    process = await spawn(env)
    events = [make_event(shop) for _ in range(400)]
    await produce(producer, isolated_settings.event_topics[0], *events)
    await receiver.wait_for(50)
    process.popen.kill()
    assert await process.wait_exit() == -signal.SIGKILL
    at_kill = len(receiver.requests)

    await spawn({**env, "DISPATCHER_HTTP_PORT": str(free_port())})
    assert at_kill < len(events)  # the kill interrupted the stream
    wanted = {e["entity"]["uuid"] for e in events}
    async with asyncio.timeout(WAIT):
        while not wanted <= {r.json()["entities"][0]["uuid"] for r in receiver.requests}:
            await receiver.wait_for(len(receiver.requests) + 1)
    # A duplicate after the crash carries the same notification_uuid as the original.
    ids_by_entity: dict[str, set[str]] = {}
    for r in receiver.requests:
        body = r.json()
        ids_by_entity.setdefault(body["entities"][0]["uuid"], set()).add(body["notification_uuid"])
    assert all(len(ids) == 1 for ids in ids_by_entity.values())


async def test_crash_mid_import_then_restart_delivers_every_entity(
    isolated_settings: Settings,
    spawn: Callable[[dict[str, str]], Awaitable[Process]],
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """A daemon killed with an import batch open re-sends its entities after the restart."""
    await subscribe(store, shop, receiver, "items", "CREATED")
    env = {**environment(isolated_settings), "DISPATCHER_IMPORT_LINGER_SECONDS": "60"}
    process = await spawn(env)
    first = [
        make_event(shop, entity_name="items", event_type="CREATED", entity={"id": i},
                   import_id="big")
        for i in range(120)
    ]  # fmt: skip
    await produce(producer, isolated_settings.event_topics[0], *first)
    await receiver.wait_for(1)  # the first 80 went out; 40 wait in an open batch
    process.popen.kill()
    await process.wait_exit()

    await spawn({**env, "DISPATCHER_HTTP_PORT": str(free_port())})
    last = make_event(
        shop, entity_name="items", event_type="CREATED", entity={"id": 120},
        import_id="big", import_end=True,
    )  # fmt: skip
    await produce(producer, isolated_settings.event_topics[0], last)
    async with asyncio.timeout(WAIT):
        while True:
            ids = {e["id"] for r in receiver.requests for e in r.json()["entities"]}
            if ids >= set(range(121)):
                break
            await receiver.wait_for(len(receiver.requests) + 1)
    assert all(len(r.json()["entities"]) <= 80 for r in receiver.requests)
