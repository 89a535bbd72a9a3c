-- When a disabled webhook was last enabled again: the disable rule counts only the
-- failures after it, so that the failures from before (the ones that disabled it, and
-- those of attempts under way, recorded just after) do not disable it again at once.
-- And until when a pending "webhook disabled" mail is claimed by the sweep sending it
-- (every process sweeps; no row lock is held while SMTP answers).
ALTER TABLE webhooks
    ADD COLUMN enabled_at                  timestamptz,
    ADD COLUMN disabled_mail_claimed_until timestamptz;
