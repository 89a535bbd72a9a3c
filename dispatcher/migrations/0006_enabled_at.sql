-- When a disabled webhook was last enabled again: the disable rule counts only the
-- failures after it, so that the failures from before (the ones that disabled it, and
-- those of attempts under way, recorded just after) do not disable it again at once.
ALTER TABLE webhooks ADD COLUMN enabled_at timestamptz;
