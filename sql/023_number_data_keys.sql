-- Crypto-shredding (issue 15). Real numbers are sealed with a data key per UTC day
-- (bridge/crypto.py), stored here wrapped by a master key that never reaches the database;
-- retention destroys a day's key once nothing sealed with it is needed any more
-- (bridge/number_keys.py), so the numbers it sealed are unreadable in old row versions, in
-- the WAL and in backups too (once the master keys that wrapped it are retired:
-- docs/production.md). This migration's Python step (bridge/store/db.py) stores the index
-- key and re-seals every number of format 1 with today's key, bound to its row.

-- The master key version new keys are wrapped with: the same for every bridge (a bridge
-- configured with a newer one keeps wrapping with this one until `maskbridge-admin keys
-- rewrap` makes the newer one active, so bridges restarted one by one all open every key).
CREATE TABLE number_master (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    version     integer NOT NULL CHECK (version >= 1),
    changed_at  timestamptz NOT NULL DEFAULT now()
);

-- One data key per UTC day, made by whichever bridge seals first that day.
CREATE TABLE number_data_keys (
    period          date PRIMARY KEY,
    master_version  integer NOT NULL CHECK (master_version >= 1),
    wrapped         bytea NOT NULL,  -- nonce + AES-256-GCM(master key, data key), bound to period and version
    created_at      timestamptz NOT NULL DEFAULT now(),
    wrapped_at      timestamptz NOT NULL DEFAULT now()
);

-- The blind index key (HMAC-SHA256 of the numbers, to find them): one, for good.
CREATE TABLE number_index_key (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    master_version  integer NOT NULL CHECK (master_version >= 1),
    wrapped         bytea NOT NULL,
    wrapped_at      timestamptz NOT NULL DEFAULT now()
);
