-- Pool numbers, order sessions, their participants, and one row per call attempt.

CREATE TABLE pool_numbers (
    number      text PRIMARY KEY CHECK (number ~ '^\+[1-9][0-9]{6,14}$'),
    region      text,
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'cooling', 'retired')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_id     text NOT NULL CHECK (length(order_id) BETWEEN 1 AND 200),
    pool_number  text NOT NULL REFERENCES pool_numbers (number),
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    closed_at    timestamptz,
    CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);

-- Opening a session is idempotent by order id: at most one open session per order.
CREATE UNIQUE INDEX sessions_one_open_per_order ON sessions (order_id) WHERE status = 'open';

-- A call is routed by (caller's real number, dialed pool number). The database itself
-- guarantees that this pair names at most one live participant, so routing can never be
-- ambiguous, however many sessions are opened at once.
CREATE TABLE participants (
    session_id   uuid NOT NULL REFERENCES sessions (id),
    role         text NOT NULL CHECK (role IN ('courier', 'client')),
    real_number  text NOT NULL CHECK (real_number ~ '^\+[1-9][0-9]{6,14}$'),
    pool_number  text NOT NULL REFERENCES pool_numbers (number),
    live         boolean NOT NULL DEFAULT true,
    PRIMARY KEY (session_id, role)
);
CREATE UNIQUE INDEX participants_live_pair ON participants (real_number, pool_number) WHERE live;
CREATE INDEX participants_pair ON participants (real_number, pool_number);

-- One row per call attempt. The channel and bridge ids are here, not only in the bridge's
-- memory, so that a restarted bridge can find and finish the calls that were up.
CREATE TABLE calls (
    id                   uuid PRIMARY KEY,
    session_id           uuid REFERENCES sessions (id),
    pool_number          text NOT NULL,
    caller_role          text CHECK (caller_role IN ('courier', 'client')),
    caller_masked        text NOT NULL,
    state                text NOT NULL CHECK (state IN ('routing', 'ringing', 'connected', 'announcing', 'ended')),
    outcome              text CHECK (outcome IN (
                             'answered', 'busy', 'no_answer', 'rejected', 'failed',
                             'caller_cancelled', 'unknown_caller', 'session_closed')),
    hangup_by            text CHECK (hangup_by IN ('caller', 'callee', 'system')),
    hangup_cause         integer,
    inbound_channel_id   text NOT NULL,
    outbound_channel_id  text,
    bridge_id            text,
    started_at           timestamptz NOT NULL DEFAULT now(),
    answered_at          timestamptz,
    ended_at             timestamptz,
    duration_seconds     numeric GENERATED ALWAYS AS (extract(epoch FROM (ended_at - answered_at))) STORED,
    CHECK ((state = 'ended') = (ended_at IS NOT NULL))
);
CREATE INDEX calls_session ON calls (session_id, started_at);
CREATE INDEX calls_active ON calls (state) WHERE state <> 'ended';
