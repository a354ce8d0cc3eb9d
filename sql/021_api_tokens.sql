-- Named API tokens with scopes (issue 15): several, each added and revoked with
-- maskbridge-admin while the bridges run. Only a SHA-256 of the secret is kept; the secret is
-- shown once, when the token is added. A token is found by its key_id, the public part of
-- the secret (mbt_<key_id>_<secret>), and its hash is then compared in constant time.
-- Names are never reused, so that an audit row's token name says one token.
CREATE TABLE api_tokens (
    name           text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    key_id         text NOT NULL UNIQUE CHECK (key_id ~ '^[a-z0-9]{12}$'),
    secret_hash    bytea NOT NULL CHECK (length(secret_hash) = 32),
    scopes         text[] NOT NULL CHECK (cardinality(scopes) > 0),
    rate_per_second real CHECK (rate_per_second > 0),  -- null: MB_API_RATE
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    revoked_at     timestamptz,
    last_used_at   timestamptz
);

-- Which token: the recording access audit names the token by name (the settings' own tokens
-- are "env", MB_API_TOKEN, and "recording", MB_RECORDING_TOKEN). The actor says the kind.
ALTER TABLE recording_access ADD COLUMN token text;
ALTER TABLE recording_access DROP CONSTRAINT recording_access_actor_check;
UPDATE recording_access SET token = 'env', actor = 'token' WHERE actor = 'api_token';
UPDATE recording_access SET token = 'recording', actor = 'token' WHERE actor = 'recording_token';
ALTER TABLE recording_access ADD CONSTRAINT recording_access_actor_check
    CHECK (actor IN ('token', 'invalid_token', 'no_token', 'retention'));
ALTER TABLE recording_access ADD CONSTRAINT recording_access_token_named CHECK ((actor = 'token') = (token IS NOT NULL));

-- The other audits the API writes: a session's history and the blocklist name the API token
-- of the request that changed them (null: maskbridge-admin, or the bridge itself).
ALTER TABLE session_events ADD COLUMN token text;
ALTER TABLE blocked_numbers ADD COLUMN created_by_token text;
