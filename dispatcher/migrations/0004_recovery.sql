-- Recovery of what an endpoint missed, and disabling a webhook that fails for days.
--
-- A disabled webhook (by the integrator, or by the recorder once every attempt failed for
-- DISPATCHER_DISABLE_AFTER_HOURS) gets no attempts: its events are counted, not sent.
-- disabled_mail_pending is true until the one email saying so was accepted by SMTP.
ALTER TABLE webhooks
    ADD COLUMN disabled_at           timestamptz,
    ADD COLUMN disabled_reason       text,
    ADD COLUMN disabled_mail_pending boolean NOT NULL DEFAULT false;

-- Recovery jobs (POST /webhooks/{id}/recover) and single resends
-- (POST /webhooks/{id}/attempts/{attempt_id}/resend). A job is run by the process that
-- holds its lease (owner, lease_until), renewed while it runs; a job whose lease ran out
-- (its process died) is taken over and resumes from progress, which is saved after every
-- notification sent: what was sent is never sent again.
CREATE TABLE webhook_recoveries (
    id             uuid        PRIMARY KEY,
    webhook_id     uuid        NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    environment_id text        NOT NULL,
    mode           text        NOT NULL CHECK (mode IN ('failed', 'replay', 'resend')),
    since          timestamptz NOT NULL,
    until          timestamptz NOT NULL,
    attempt_id     uuid,       -- resend: the attempt whose request body is sent again
    state          text        NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    scanned        bigint      NOT NULL DEFAULT 0,
    matched        bigint      NOT NULL DEFAULT 0,
    sent           bigint      NOT NULL DEFAULT 0,
    delivered      bigint      NOT NULL DEFAULT 0,
    failed         bigint      NOT NULL DEFAULT 0,
    progress       jsonb,      -- where the job stopped (per mode)
    error          text,       -- why a job failed
    owner          text,       -- the process running it
    lease_until    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz
);

-- One recovery job queued or running per webhook (resends are not limited).
CREATE UNIQUE INDEX webhook_recoveries_one_active ON webhook_recoveries (webhook_id)
    WHERE state IN ('queued', 'running') AND mode <> 'resend';
-- The runners' poll: jobs still to run, oldest first.
CREATE INDEX webhook_recoveries_to_run ON webhook_recoveries (created_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX webhook_recoveries_by_webhook ON webhook_recoveries (webhook_id, created_at DESC);
