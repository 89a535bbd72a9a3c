-- Secret rotation: after POST /webhooks/{id}/secret/rotate the replaced secret still signs
-- deliveries (next to the new one) until previous_secret_until, so receivers can switch
-- without missing a notification. Rotating again within that period replaces it: only the
-- newest previous secret is kept. Both columns are NULL for a webhook never rotated.
ALTER TABLE webhooks
    ADD COLUMN previous_secret       text,
    ADD COLUMN previous_secret_until timestamptz,
    ADD CONSTRAINT webhooks_previous_secret_pair
        CHECK ((previous_secret IS NULL) = (previous_secret_until IS NULL));
