-- Static API tokens: one token = one shop (environment_id) + one integration (client_id).
-- Only the SHA-256 of the token is stored; tokens are 256-bit random strings.
CREATE TABLE api_tokens (
    id             uuid PRIMARY KEY,
    token_hash     bytea NOT NULL UNIQUE,
    environment_id text NOT NULL,
    client_id      text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);

-- Webhooks: one per shop per (entity_name, event_type).
CREATE TABLE webhooks (
    id             uuid PRIMARY KEY,
    environment_id text NOT NULL,
    client_id      text NOT NULL,
    entity_name    text NOT NULL,
    event_type     text NOT NULL,
    url            text NOT NULL,
    email          text NOT NULL,
    secret         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhooks_one_per_shop_event UNIQUE (environment_id, entity_name, event_type)
);

-- Every change to webhooks, whoever makes it, is announced to running dispatchers.
CREATE FUNCTION webhooks_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'webhooks_changed',
        json_build_object('op', TG_OP, 'id', COALESCE(NEW.id, OLD.id))::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER webhooks_notify
    AFTER INSERT OR UPDATE OR DELETE ON webhooks
    FOR EACH ROW EXECUTE FUNCTION webhooks_notify();
