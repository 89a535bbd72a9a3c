"""The subscriptions store in PostgreSQL: static tokens and webhooks.

Only the SHA-256 of a token is stored. Tokens carry 256 random bits, so a fast hash is
enough: nobody can brute-force a preimage, and lookups stay one index probe.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

TOKEN_PREFIX = "dsp_"
SECRET_PREFIX = "whsec_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token speaks for."""

    token_id: uuid.UUID
    environment_id: str
    client_id: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed: never the token itself."""

    id: uuid.UUID
    environment_id: str
    client_id: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Webhook:
    """One subscription: a shop's endpoint for one (entity_name, event_type)."""

    id: uuid.UUID
    environment_id: str
    client_id: str
    entity_name: str
    event_type: str
    url: str
    email: str
    secret: str = field(repr=False)  # never in a repr, so never in a log line by accident
    created_at: datetime
    # The secret replaced by the last rotation, still signing deliveries until
    # ``previous_secret_until``; both None when the webhook was never rotated.
    previous_secret: str | None = field(default=None, repr=False)
    previous_secret_until: datetime | None = None
    # Set while the webhook is disabled (by its integrator, or after failing for days):
    # no attempts are made, its events are counted and not sent.
    disabled_at: datetime | None = None
    disabled_reason: str | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    def public(self) -> dict[str, str]:
        """The API representation, without the secret (see :meth:`with_secret`)."""
        return {
            "id": str(self.id),
            "url": self.url,
            "entity_name": self.entity_name,
            "event_type": self.event_type,
            "email": self.email,
            "environment_id": self.environment_id,
            "client_id": self.client_id,
            "created_at": _iso(self.created_at),
        }

    def with_secret(self) -> dict[str, str]:
        """:meth:`public` plus the signing secret: only the answer of the create shows it."""
        return {**self.public(), "secret": self.secret}

    def secret_info(self, now: float) -> dict[str, str | None]:
        """The answer of ``/secret`` and ``/secret/rotate`` at ``now`` (Unix seconds): the
        secret, and until when the previous one still signs deliveries too (None if it no
        longer does, or never did).

        The previous secret itself is never shown: its owner had it already, and a rotation
        after a leak must not hand the leaked secret out again.
        """
        until = self.previous_secret_until
        shown = _iso(until) if until is not None and len(self.signing_secrets(now)) > 1 else None
        return {"secret": self.secret, "previous_secret_expires_at": shown}

    def signing_secrets(self, now: float) -> tuple[str, ...]:
        """The secrets that sign a delivery at ``now`` (Unix seconds), the current one first."""
        until = self.previous_secret_until
        if self.previous_secret is None or until is None or until.timestamp() <= now:
            return (self.secret,)
        return (self.secret, self.previous_secret)


class DuplicateWebhook(Exception):
    """The shop already has a webhook for this (entity_name, event_type)."""

    def __init__(self, existing_id: uuid.UUID | None) -> None:
        super().__init__(f"webhook {existing_id} already exists")
        self.existing_id = existing_id


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


_WEBHOOK_COLUMNS = (
    "id, environment_id, client_id, entity_name, event_type, url, email, secret, created_at, "
    "previous_secret, previous_secret_until, disabled_at, disabled_reason"
)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _webhook(row: asyncpg.Record) -> Webhook:
    return Webhook(**dict(row.items()))


LOAD_CHUNK = 10_000  # rows of the full load fetched at a time


def _cached_webhook(row: asyncpg.Record, names: dict[str, str]) -> Webhook:
    """A webhook of the full load: the columns in field order (see _WEBHOOK_COLUMNS), and
    the values that repeat from one webhook to the next (client ids, entity names, event
    types) shared through ``names`` rather than held once per webhook."""
    (id_, env, client, entity, event, *rest) = row
    client = names.setdefault(client, client)
    entity = names.setdefault(entity, entity)
    event = names.setdefault(event, event)
    return Webhook(id_, env, client, entity, event, *rest)


class Store:
    """Typed queries over a pool. Every webhook query is scoped to one shop."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- tokens -------------------------------------------------------------------------

    async def issue_token(self, environment_id: str, client_id: str) -> tuple[TokenInfo, str]:
        """Create a token; return its listing and the token, which is shown only now."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = await self._pool.fetchrow(
            """INSERT INTO api_tokens (id, token_hash, environment_id, client_id)
               VALUES ($1, $2, $3, $4)
               RETURNING id, environment_id, client_id, created_at, revoked_at""",
            uuid.uuid4(),
            hash_token(token),
            environment_id,
            client_id,
        )
        assert row is not None
        return TokenInfo(**dict(row.items())), token

    async def revoke_token(self, token_id: uuid.UUID) -> bool:
        """Revoke a token by id; False if there is no such live token."""
        result = await self._pool.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            token_id,
        )
        return result == "UPDATE 1"

    async def list_tokens(self, environment_id: str | None = None) -> list[TokenInfo]:
        rows = await self._pool.fetch(
            """SELECT id, environment_id, client_id, created_at, revoked_at FROM api_tokens
               WHERE $1::text IS NULL OR environment_id = $1 ORDER BY created_at, id""",
            environment_id,
        )
        return [TokenInfo(**dict(r.items())) for r in rows]

    async def authenticate(self, token: str) -> Principal | None:
        """The principal of a live token, or None."""
        row = await self._pool.fetchrow(
            """SELECT id, environment_id, client_id FROM api_tokens
               WHERE token_hash = $1 AND revoked_at IS NULL""",
            hash_token(token),
        )
        if row is None:
            return None
        return Principal(row["id"], row["environment_id"], row["client_id"])

    # --- webhooks -----------------------------------------------------------------------

    async def create_webhook(
        self,
        principal: Principal,
        *,
        url: str,
        entity_name: str,
        event_type: str,
        email: str,
        secret: str | None = None,
    ) -> Webhook:
        """Insert a webhook; raise :class:`DuplicateWebhook` if the shop has one already.

        The unique constraint decides races between concurrent creates. ``secret`` is the
        signing secret (from :func:`new_secret`) when the caller used it already, e.g. to
        sign the test message; a fresh one is made when it is None.
        """
        try:
            row = await self._pool.fetchrow(
                f"""INSERT INTO webhooks (id, environment_id, client_id, entity_name,
                                          event_type, url, email, secret)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                    RETURNING {_WEBHOOK_COLUMNS}""",  # noqa: S608 - constant column list
                uuid.uuid4(),
                principal.environment_id,
                principal.client_id,
                entity_name,
                event_type,
                url,
                email,
                secret if secret is not None else new_secret(),
            )
        except asyncpg.UniqueViolationError:
            existing = await self.find_webhook(principal.environment_id, entity_name, event_type)
            raise DuplicateWebhook(existing.id if existing else None) from None
        assert row is not None
        return _webhook(row)

    async def find_webhook(
        self, environment_id: str, entity_name: str, event_type: str
    ) -> Webhook | None:
        row = await self._pool.fetchrow(
            f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks
                WHERE environment_id = $1 AND entity_name = $2 AND event_type = $3""",  # noqa: S608
            environment_id,
            entity_name,
            event_type,
        )
        return _webhook(row) if row else None

    async def get_webhook(self, environment_id: str, webhook_id: uuid.UUID) -> Webhook | None:
        row = await self._pool.fetchrow(
            f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks
                WHERE id = $1 AND environment_id = $2""",  # noqa: S608
            webhook_id,
            environment_id,
        )
        return _webhook(row) if row else None

    async def count_webhooks(self, environment_id: str) -> int:
        value = await self._pool.fetchval(
            "SELECT count(*) FROM webhooks WHERE environment_id = $1", environment_id
        )
        return int(value)

    async def list_webhooks(
        self, environment_id: str, *, limit: int | None = None, offset: int = 0
    ) -> list[Webhook]:
        rows = await self._pool.fetch(
            f"""SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE environment_id = $1
                ORDER BY created_at, id LIMIT $2 OFFSET $3""",  # noqa: S608
            environment_id,
            limit,
            offset,
        )
        return [_webhook(r) for r in rows]

    async def rotate_secret(
        self, environment_id: str, webhook_id: uuid.UUID, grace_seconds: float
    ) -> Webhook | None:
        """Give the webhook a new secret; the old one keeps signing for ``grace_seconds``.

        One UPDATE, so concurrent rotations serialize on the row. Rotating again within the
        grace period replaces the previous secret with the one being rotated out now: the
        newest previous secret wins, the older one stops signing at once. A grace of 0 keeps
        no previous secret. None if the shop has no such webhook. Running dispatchers hear
        of it through the NOTIFY trigger.
        """
        row = await self._pool.fetchrow(
            f"""UPDATE webhooks
                SET previous_secret = CASE WHEN $3::float8 > 0 THEN secret END,
                    previous_secret_until = CASE WHEN $3::float8 > 0
                        THEN now() + make_interval(secs => $3::float8) END,
                    secret = $4
                WHERE id = $1 AND environment_id = $2
                RETURNING {_WEBHOOK_COLUMNS}""",  # noqa: S608 - constant column list
            webhook_id,
            environment_id,
            grace_seconds,
            new_secret(),
        )
        return _webhook(row) if row else None

    async def set_disabled(
        self, environment_id: str, webhook_id: uuid.UUID, reason: str | None
    ) -> Webhook | None:
        """Disable the webhook (``reason`` given) or enable it (None); None if the shop
        has no such webhook. Disabling a disabled webhook keeps its first time and reason.
        Running dispatchers hear of it through the NOTIFY trigger."""
        row = await self._pool.fetchrow(
            f"""UPDATE webhooks
                SET disabled_at = CASE WHEN $3::text IS NULL THEN NULL
                                       ELSE coalesce(disabled_at, now()) END,
                    disabled_reason = CASE WHEN $3::text IS NULL THEN NULL
                                           ELSE coalesce(disabled_reason, $3) END,
                    disabled_mail_pending = false,
                    disabled_mail_claimed_until = NULL,
                    enabled_at = CASE WHEN $3::text IS NULL AND disabled_at IS NOT NULL
                                      THEN now() ELSE enabled_at END
                WHERE id = $1 AND environment_id = $2
                RETURNING {_WEBHOOK_COLUMNS}""",  # noqa: S608 - constant column list
            webhook_id,
            environment_id,
            reason,
        )
        return _webhook(row) if row else None

    async def delete_webhook(self, environment_id: str, webhook_id: uuid.UUID) -> bool:
        result = await self._pool.execute(
            "DELETE FROM webhooks WHERE id = $1 AND environment_id = $2",
            webhook_id,
            environment_id,
        )
        return result == "DELETE 1"

    async def all_webhooks(self) -> list[Webhook]:
        """Every webhook, for the dispatcher's cache: read through a cursor, so that the
        rows of a million webhooks are never all held beside the webhooks made of them."""
        names: dict[str, str] = {}
        webhooks: list[Webhook] = []
        query = f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks"  # noqa: S608
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            cursor = await conn.cursor(query)
            while rows := await cursor.fetch(LOAD_CHUNK):
                webhooks += [_cached_webhook(r, names) for r in rows]
        return webhooks

    async def webhook_by_id(self, webhook_id: uuid.UUID) -> Webhook | None:
        """One webhook whatever its shop, for the cache and retries."""
        row = await self._pool.fetchrow(
            f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1",  # noqa: S608
            webhook_id,
        )
        return _webhook(row) if row else None
