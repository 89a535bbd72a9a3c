"""The recovery routes of the API: resend, recover, recovery jobs, disable and enable.

::

    POST   /webhooks/{id}/attempts/{attempt_id}/resend   202: the attempt's request body
                                                       once more (no retries, no mails)
    POST   /webhooks/{id}/recover                      202: a job (mode failed or replay)
    GET    /webhooks/{id}/recoveries                   the webhook's jobs, newest first
    GET    /webhooks/{id}/recoveries/{job_id}          one job
    DELETE /webhooks/{id}/recoveries/{job_id}          cancel it (200 with the job)
    POST   /webhooks/{id}/disable                      200: the webhook, disabled
    POST   /webhooks/{id}/enable                       200: the webhook, enabled; with
                                                       ``recover_since`` a replay from then

Same token, same error shape and the same 404 for another shop's webhook as the rest of
:mod:`dispatcher.api`; jobs are run by the consuming processes
(:mod:`dispatcher.recovery_runner`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from aiokafka.errors import KafkaError

from dispatcher import api
from dispatcher.api import ApiError
from dispatcher.history import History
from dispatcher.recovery import (
    MODES,
    ActiveJob,
    BadRange,
    Job,
    Jobs,
    check_log_holds,
    check_range,
)
from dispatcher.settings import Settings
from dispatcher.store import Store, Webhook

log = structlog.get_logger(__name__)

RECOVER_FIELDS = ("since", "until", "mode")
ENABLE_FIELDS = ("recover_since",)
DISABLED_BY_INTEGRATOR = "disabled by its integrator (POST /webhooks/{id}/disable)"


def add_routes(
    app: web.Application,
    *,
    store: Store,
    history: History | None,
    jobs: Jobs,
    settings: Settings,
) -> None:
    handlers = RecoveryHandlers(store, Recoveries(store, history, jobs, settings))
    router = app.router
    router.add_post("/webhooks/{id}/attempts/{attempt_id}/resend", handlers.resend)
    router.add_post("/webhooks/{id}/recover", handlers.recover)
    router.add_get("/webhooks/{id}/recoveries", handlers.list_jobs, allow_head=False)
    router.add_get("/webhooks/{id}/recoveries/{job_id}", handlers.get_job, allow_head=False)
    router.add_delete("/webhooks/{id}/recoveries/{job_id}", handlers.cancel_job)
    router.add_post("/webhooks/{id}/disable", handlers.disable)
    router.add_post("/webhooks/{id}/enable", handlers.enable)


class RecoveryHandlers:
    """The routes: authenticate, decode, call :class:`Recoveries`, answer JSON."""

    def __init__(self, store: Store, recoveries: Recoveries) -> None:
        self._store = store
        self._recoveries = recoveries

    async def _webhook(self, request: web.Request) -> Webhook:
        principal = await api.authenticate(request, self._store)
        return await api.own_webhook(request, principal, self._store)

    async def resend(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        job = await self._recoveries.resend(webhook, request.match_info["attempt_id"])
        return _job_response(job, 202)

    async def recover(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        job = await self._recoveries.recover(webhook, await api.read_json(request))
        return _job_response(job, 202)

    async def list_jobs(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        jobs = await self._recoveries.jobs(webhook)
        return api.json_response({"results": [j.to_json() for j in jobs]})

    async def get_job(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        job = await self._recoveries.job(webhook, request.match_info["job_id"])
        return _job_response(job, 200)

    async def cancel_job(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        job = await self._recoveries.cancel(webhook, request.match_info["job_id"])
        return _job_response(job, 200)

    async def disable(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        changed = await self._recoveries.disable(webhook, request.match_info["id"])
        return api.json_response(await self._recoveries.webhook_json(changed))

    async def enable(self, request: web.Request) -> web.Response:
        webhook = await self._webhook(request)
        data = await api.read_json(request) if request.can_read_body else None
        changed, job = await self._recoveries.enable(webhook, data, request.match_info["id"])
        body = await self._recoveries.webhook_json(changed)
        if job is not None:
            body["recovery"] = job.to_json()
        return api.json_response(body)


class Recoveries:
    """Resend, recover, recovery jobs, disable and enable, for the API's routes and the
    portal (:mod:`dispatcher.portal`) alike; each refusal is an :class:`ApiError`."""

    def __init__(
        self, store: Store, history: History | None, jobs: Jobs, settings: Settings
    ) -> None:
        self._store = store
        self._history = history
        self._jobs = jobs
        self._settings = settings

    async def webhook_json(self, webhook: Webhook) -> dict[str, Any]:
        return await api.webhook_json(webhook, self._history)

    async def resend(self, webhook: Webhook, raw_attempt_id: str) -> Job:
        """Queue the attempt's request body once more (202); 404/409 when it cannot."""
        if self._history is None:
            raise ApiError(
                404, "the delivery history is off on this server (DISPATCHER_ATTEMPT_LOG=off)"
            )
        raw = raw_attempt_id
        try:
            attempt_id = uuid.UUID(raw)
        except ValueError:
            raise ApiError(404, f"no attempt with id {raw[:100]!r}") from None
        row = await self._history.attempt(webhook.id, attempt_id)
        if row is None:
            raise ApiError(404, f"no attempt with id {raw[:100]!r}")
        if row["request_body"] is None:
            raise ApiError(
                409,
                "this attempt keeps no request body (only failed attempts keep theirs): "
                "to get a delivered notification again, replay its time range "
                "(POST /webhooks/{id}/recover with mode replay)",
            )
        at = row["attempted_at"]
        job = await self._jobs.create(webhook, "resend", at, at, attempt_id=attempt_id)
        log.info("resend_queued", webhook_id=str(webhook.id), attempt_id=str(attempt_id))
        return job

    async def recover(self, webhook: Webhook, data: object) -> Job:
        """Queue a job from a ``POST /recover`` body (decoded): ``mode``, ``since``,
        ``until``; 400/409/422 naming what is wrong."""
        fields = _object(data, RECOVER_FIELDS)
        mode = fields.get("mode")
        if mode not in MODES:
            raise ApiError(
                400, f"mode: expected one of {', '.join(MODES)}, got {mode!r}"[:200], field="mode"
            )
        since = _time(fields, "since", required=True)
        assert since is not None
        until = _time(fields, "until")
        if mode == "failed" and self._history is None:
            raise ApiError(
                422,
                "mode: failed needs the delivery history, which is off on this server "
                "(DISPATCHER_ATTEMPT_LOG=off); mode replay reads the event log instead",
                field="mode",
            )
        if webhook.disabled:
            raise _disabled(webhook)
        return await self._start(webhook, mode, since, until, field="since")

    async def jobs(self, webhook: Webhook) -> list[Job]:
        return await self._jobs.of_webhook(webhook.id)

    async def job(self, webhook: Webhook, raw_job_id: str) -> Job:
        """One recovery job of the webhook (not a resend); 404 otherwise."""
        job = await self._jobs.get(webhook.id, _job_id(raw_job_id))
        if job is None or job.mode == "resend":
            raise _no_job(raw_job_id)
        return job

    async def cancel(self, webhook: Webhook, raw_job_id: str) -> Job:
        job_id = _job_id(raw_job_id)
        existing = await self._jobs.get(webhook.id, job_id)
        if existing is None or existing.mode == "resend":
            raise _no_job(raw_job_id)
        job = await self._jobs.cancel(webhook.id, job_id)
        if job is None:
            raise _no_job(raw_job_id)
        log.info("recovery_job_cancelled", webhook_id=str(webhook.id), job_id=str(job_id))
        return job

    async def disable(self, webhook: Webhook, raw_id: str) -> Webhook:
        changed = await self._store.set_disabled(
            webhook.environment_id, webhook.id, DISABLED_BY_INTEGRATOR
        )
        if changed is None:
            raise api.no_webhook(raw_id)
        log.info("webhook_disabled_by_integrator", webhook_id=str(webhook.id))
        return changed

    async def enable(
        self, webhook: Webhook, data: object | None, raw_id: str
    ) -> tuple[Webhook, Job | None]:
        """Enable the webhook; with ``recover_since`` in ``data`` (an ``enable`` body,
        decoded) a replay from then, whose range is checked before anything changes."""
        since = None
        if data is not None:
            since = _time(_object(data, ENABLE_FIELDS), "recover_since")
        job = None
        if since is not None:
            # Checked before enabling: a refused range changes nothing.
            now = datetime.now(UTC)
            self._checked_range(since, None, now, "recover_since")
            await self._check_log(since, "recover_since")
            await self._refuse_active(webhook)
        changed = await self._store.set_disabled(webhook.environment_id, webhook.id, None)
        if changed is None:
            raise api.no_webhook(raw_id)
        log.info("webhook_enabled", webhook_id=str(webhook.id), recover_since=since is not None)
        if since is not None:
            job = await self._start(changed, "replay", since, None, field="recover_since")
        return changed, job

    # --- helpers ------------------------------------------------------------------------

    async def _start(
        self,
        webhook: Webhook,
        mode: str,
        since: datetime,
        until: datetime | None,
        *,
        field: str,
    ) -> Job:
        now = datetime.now(UTC)
        since, until = self._checked_range(since, until, now, field)
        if mode == "replay":
            await self._check_log(since, field)
        try:
            job = await self._jobs.create(webhook, "replay" if mode == "replay" else "failed",
                                          since, until)  # fmt: skip
        except ActiveJob as exc:
            raise _active(exc.existing) from None
        log.info("recovery_job_queued", webhook_id=str(webhook.id), job_id=str(job.id), mode=mode)
        return job

    def _checked_range(
        self, since: datetime, until: datetime | None, now: datetime, field: str
    ) -> tuple[datetime, datetime]:
        try:
            return check_range(
                since, until, now=now, max_days=self._settings.recovery_max_days, field=field
            )
        except BadRange as exc:
            raise ApiError(exc.status, exc.message, field=exc.field) from None

    async def _check_log(self, since: datetime, field: str) -> None:
        try:
            await check_log_holds(self._settings, since, field=field)
        except BadRange as exc:
            raise ApiError(exc.status, exc.message, field=exc.field) from None
        except KafkaError as exc:
            log.warning("recovery_kafka_unavailable", error=repr(exc))
            raise ApiError(
                503,
                "Kafka is unavailable: cannot tell what the event log holds; try again shortly",
                kind="service_unavailable",
                headers={"Retry-After": "5"},
            ) from None

    async def _refuse_active(self, webhook: Webhook) -> None:
        for job in await self._jobs.of_webhook(webhook.id, limit=5):
            if job.active:
                raise _active(job.id)


def _object(data: object, fields: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ApiError(
            400,
            f"unknown field {unknown[0][:100]!r}; the fields are {', '.join(fields)}",
            field=unknown[0][:100],
        )
    return data


def _time(data: dict[str, Any], name: str, *, required: bool = False) -> datetime | None:
    raw = data.get(name)
    if raw is None:
        if required:
            raise ApiError(400, f"{name}: required (an ISO 8601 time)", field=name)
        return None
    if not isinstance(raw, str):
        raise ApiError(400, f"{name}: expected an ISO 8601 time as a string", field=name)
    return api.moment({name: raw}, name)


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _no_job(raw) from None


def _no_job(raw: str) -> ApiError:
    return ApiError(404, f"no recovery job with id {raw[:100]!r}")


def _active(existing: uuid.UUID | None) -> ApiError:
    which = f" ({existing})" if existing else ""
    return ApiError(
        409,
        f"this webhook already has a recovery job{which} queued or running; wait for it or "
        "cancel it (DELETE /webhooks/{id}/recoveries/{job_id})",
    )


def _disabled(webhook: Webhook) -> ApiError:
    return ApiError(
        409,
        f"webhook {webhook.id} is disabled: enable it (POST /webhooks/{{id}}/enable, with "
        "recover_since to replay what it missed)",
    )


def _job_response(job: Job, status: int) -> web.Response:
    return api.json_response(job.to_json(), status=status)
