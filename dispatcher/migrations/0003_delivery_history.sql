-- The delivery history: one row per attempt (first tries, retries, import batches, the
-- SUBSCRIBED test), written in batches by the recorder from the attempt topic.
-- Partitioned by day (partitions created ahead and dropped after
-- DISPATCHER_ATTEMPT_RETENTION_DAYS by the recorder): retention never deletes rows.
-- A replayed record has the same (id, attempted_at): ON CONFLICT DO NOTHING skips it.
CREATE TABLE webhook_attempts (
    id                uuid        NOT NULL,
    attempted_at      timestamptz NOT NULL,
    webhook_id        uuid        NOT NULL,
    environment_id    text        NOT NULL,
    notification_uuid uuid        NOT NULL,
    n_retry           integer     NOT NULL,
    duration_ms       real        NOT NULL,
    outcome           text        NOT NULL,  -- delivered, http, timeout, connection, tls, blocked
    status            smallint,
    error             text,
    entity_ids        text[]      NOT NULL,
    trigger           text        NOT NULL,  -- scheduled, retry, subscribe, manual, recovery
    request_body      text,                  -- failed attempts only
    response_body     text,                  -- failed attempts only: the first 4 KiB
    PRIMARY KEY (id, attempted_at)
) PARTITION BY RANGE (attempted_at);

-- The queries of the API and the CLI only: one webhook's attempts newest first (with its
-- filters), one notification's, and a shop's by entity id.
CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, attempted_at DESC, id DESC);
CREATE INDEX webhook_attempts_by_notification ON webhook_attempts (notification_uuid);
CREATE INDEX webhook_attempts_by_entity ON webhook_attempts USING gin (entity_ids);

-- Each webhook's health, kept by the recorder with every batch it writes (from the rows
-- actually inserted, so a replay changes nothing).
CREATE TABLE webhook_health (
    webhook_id           uuid PRIMARY KEY,
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0
);
