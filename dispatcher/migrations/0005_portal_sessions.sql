-- Sessions of the integrators' portal (/portal/): a shop's token exchanged for a cookie.
--
-- Only the SHA-256 of the random session id is kept (the cookie holds the id itself), so
-- a read of this table signs nobody in. A session speaks for its token: revoking or
-- deleting the token ends it (the lookup joins api_tokens), signing out deletes the row.
-- Rows past expires_at are refused, and deleted at the next sign-in.
CREATE TABLE portal_sessions (
    id_hash    bytea       PRIMARY KEY,
    token_id   uuid        NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX portal_sessions_expiry ON portal_sessions (expires_at);
CREATE INDEX portal_sessions_by_token ON portal_sessions (token_id);
