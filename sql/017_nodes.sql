-- Several nodes (an Asterisk each, with its own bridge) share this database. A masked call
-- never spans nodes: its row names the node whose Asterisk holds its channels, and only that
-- node's bridge resumes or finishes it. A node's bridge beats its heart here; the reaper of
-- any other node ends the calls of a node that went silent (and whose Asterisk no longer
-- answers SIP) as 'node_lost'. The audio of a recording stays in the spool of its node.
CREATE TABLE nodes (
    id            text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    started_at    timestamptz NOT NULL DEFAULT now(),  -- its bridge's current run
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    api_url       text,  -- where the other bridges reach its API (a recording's audio)
    sip_address   text   -- host:port of its Asterisk, probed before its calls are given up
);

-- Rows written before there were nodes belong to the node a single-box deployment runs as.
ALTER TABLE calls ADD COLUMN node text NOT NULL DEFAULT 'node-1';
ALTER TABLE calls ALTER COLUMN node DROP DEFAULT;
CREATE INDEX calls_in_progress_by_node ON calls (node) WHERE state <> 'ended';

ALTER TABLE calls DROP CONSTRAINT calls_outcome_check;
ALTER TABLE calls ADD CONSTRAINT calls_outcome_check CHECK (outcome IN (
    'answered', 'busy', 'no_answer', 'rejected', 'failed',
    'caller_cancelled', 'unknown_caller', 'session_closed', 'blocked', 'call_limit', 'quiet_hours',
    'unreachable', 'wrong_code', 'locked_out', 'redirected', 'not_confirmed', 'node_lost'));
