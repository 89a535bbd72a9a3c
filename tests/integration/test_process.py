"""The `dispatcher` process as operators run it: signals, crashes and restarts, JSON logs."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from tests.integration.support import WAIT, Spawn, World, environment, free_port, make_event


async def test_sigterm_drains_and_exits_zero_with_json_logs(world: World, spawn: Spawn) -> None:
    """SIGTERM lets deliveries in flight finish, then the process exits 0; logs are JSON."""
    await world.subscribe(entity="sales", event="CLOSED")
    process = await spawn(environment(world.settings))
    release = asyncio.Event()
    answered: list[bool] = []  # one entry per answer sent: was the daemon still running?

    async def hold_then_answer(request: web.Request, _n: int) -> web.StreamResponse:
        await release.wait()
        response = web.Response(status=200)
        await response.prepare(request)
        await response.write_eof()  # the answer is sent: the delivery is complete
        answered.append(process.popen.poll() is None)
        return response

    world.receiver.responder = hold_then_answer
    await world.produce(make_event(world.shop))
    (held,) = await world.receiver.wait_for(1)  # the delivery is in flight, held by the receiver
    process.popen.send_signal(signal.SIGTERM)
    await process.wait_logged("daemon_stopping")  # draining: only now is the delivery let go
    release.set()
    assert await process.wait_exit() == 0
    events = [line["event"] for line in process.lines()]
    assert "daemon_started" in events and events[-1] == "daemon_stopped"
    delivered = [line for line in process.lines() if line["event"] == "delivery"]
    assert [d["outcome"] for d in delivered] == ["delivered"]
    # The held delivery completed after SIGTERM, during the drain, before the exit.
    assert delivered[0]["notification_uuid"] == held.headers["webhook-id"]
    stopping, delivery, stopped = (
        events.index(e) for e in ("daemon_stopping", "delivery", "daemon_stopped")
    )
    assert events.index("signal_received") < stopping < delivery < stopped
    assert answered == [True]


async def test_sigkill_mid_stream_then_restart_loses_no_event(world: World, spawn: Spawn) -> None:
    """Killed with SIGKILL mid-stream and restarted, the daemon delivers every event."""
    receiver = world.receiver
    await world.subscribe(entity="sales", event="CLOSED")
    env = environment(world.settings)
    process = await spawn(env)
    events = [make_event(world.shop) for _ in range(400)]
    await world.produce(*events)
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
    world: World, spawn: Spawn
) -> None:
    """A daemon killed with an import batch open re-sends its entities after the restart."""
    receiver, shop = world.receiver, world.shop
    await world.subscribe(entity="items", event="CREATED")
    env = {**environment(world.settings), "DISPATCHER_IMPORT_LINGER_SECONDS": "60"}
    process = await spawn(env)
    first = [
        make_event(shop, entity_name="items", event_type="CREATED", entity={"id": i},
                   import_id="big")
        for i in range(120)
    ]  # fmt: skip
    await world.produce(*first)
    await receiver.wait_for(1)  # the first 80 went out; 40 wait in an open batch
    process.popen.kill()
    await process.wait_exit()

    await spawn({**env, "DISPATCHER_HTTP_PORT": str(free_port())})
    last = make_event(
        shop, entity_name="items", event_type="CREATED", entity={"id": 120},
        import_id="big", import_end=True,
    )  # fmt: skip
    await world.produce(last)
    async with asyncio.timeout(WAIT):
        while True:
            ids = {e["id"] for r in receiver.requests for e in r.json()["entities"]}
            if ids >= set(range(121)):
                break
            await receiver.wait_for(len(receiver.requests) + 1)
    assert all(len(r.json()["entities"]) <= 80 for r in receiver.requests)
