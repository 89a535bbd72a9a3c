"""``/healthz``, ``/readyz`` and ``/metrics``: what the process says about itself.

``/healthz`` (liveness) is 200 while every long-lived loop runs. ``/readyz`` is 200 when
this process can do its job: the subscription cache is current, every consumer has its
partitions and none is stuck at an undecodable batch, the database answers, and under
``kafka`` this process's own clients work: a bootstrap broker accepts connections, and
none of the problems :class:`dispatcher.kafka.KafkaHealth` samples lasted over 4 s (a
partition whose leader answers no fetch, no group coordinator, commits failing or
unanswered, records unacknowledged, a partition leader the producer cannot reach); once
failing, it stays failing until a commit after the problems cleared proves the outage
over (or 10 s passed without one).
Otherwise 503, each failing check with its reason. Both answer
``{"status": "ok"|"fail", "checks": {name: "ok" | reason}}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher.cache import SubscriptionCache
from dispatcher.consumer import Consumer
from dispatcher.metrics import Metrics


@dataclass
class Health:
    """The checks of one process; :meth:`routes` adds its three endpoints to an app."""

    metrics: Metrics
    cache: SubscriptionCache
    consumers: Sequence[Consumer]  # filled in as they start
    kafka_bootstrap: str
    kafka_problems: Callable[[], list[str]]  # what KafkaHealth found (once it runs)
    consumes: bool
    stopping: asyncio.Event
    dead_loops: Callable[[], list[str]]
    pool: Callable[[], asyncpg.Pool | None]

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)

    async def metrics_page(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, _request: web.Request) -> web.Response:
        dead = self.dead_loops()
        return checks_response({"loops": "ok" if not dead else f"stopped: {', '.join(dead)}"})

    async def readyz(self, _request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        if self.stopping.is_set():
            checks["shutdown"] = "stopping"
        if self.consumes:
            checks["cache"] = "ok" if self.cache.current.is_set() else self.cache.stale_reason
            unassigned = [c.name for c in self.consumers if not c.assigned.is_set()]
            if not self.consumers or unassigned:
                checks["kafka"] = f"not assigned: {', '.join(unassigned) or 'starting'}"
            else:
                checks["kafka"] = await kafka_check(self.kafka_bootstrap)
                if checks["kafka"] == "ok" and (problems := self.kafka_problems()):
                    checks["kafka"] = "; ".join(problems)
            stuck = [reason for c in self.consumers for reason in c.undecodable.reasons()]
            checks["decoding"] = "ok" if not stuck else "undecodable batch: " + "; ".join(stuck)
        checks["database"] = await self._database_check()
        return checks_response(checks)

    async def _database_check(self) -> str:
        pool = self.pool()
        if pool is None:
            return "starting"
        try:  # asyncpg's timeouts: cancelled from outside, it would wait for the server
            async with pool.acquire(timeout=2) as conn:  # bounds the release too
                await conn.fetchval("SELECT 1", timeout=2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"unreachable: {type(exc).__name__}"
        return "ok"


async def kafka_check(bootstrap: str) -> str:
    """ "ok" if a bootstrap broker accepts a TCP connection within a second (whether the
    clients can work with the cluster is :class:`dispatcher.kafka.KafkaHealth`'s)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        return "ok"
    return "unreachable"


def checks_response(checks: dict[str, str]) -> web.Response:
    """The JSON of ``/healthz`` and ``/readyz``: 200 when every check is ok, else 503."""
    ok = all(v == "ok" for v in checks.values())
    return web.Response(
        body=orjson.dumps({"status": "ok" if ok else "fail", "checks": checks}),
        status=200 if ok else 503,
        content_type="application/json",
    )
