-- Order-code mode (issue 4): a pool number can be shared by many orders at once, told apart
-- by an order code the caller keys in, instead of by the (real number, pool number) pair.
--
-- * pool_numbers.mode: 'direct' (routed by the pair, as before) or 'order_code'. The direct
--   allocator never hands out an order-code number.
-- * sessions.mode / order_code: a session opened in order-code mode has a code of digits,
--   unique among the live (open or grace) sessions on its number.
-- * participants.by_code: participants of such a session are reached by code, so the
--   one-holder-per-pair rule does not apply to them (one courier may have two orders on the
--   same shared number; the code tells them apart).
-- * order_code_failures: wrong codes, by the caller's keyed blind index (never the number),
--   for the lockout after MB_ORDER_CODE_ATTEMPTS wrong codes within MB_ORDER_CODE_LOCKOUT.
-- * calls: the caller keys the code in state 'entering_code'; outcomes 'wrong_code' (the call
--   ended after wrong codes) and 'locked_out' (refused without asking for a code).

ALTER TABLE pool_numbers
    ADD COLUMN mode text NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'order_code'));

ALTER TABLE sessions
    ADD COLUMN mode       text NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'order_code')),
    ADD COLUMN order_code text CHECK (order_code ~ '^[0-9]{4,12}$'),
    ADD CONSTRAINT sessions_order_code_mode CHECK ((mode = 'order_code') = (order_code IS NOT NULL));
CREATE UNIQUE INDEX sessions_live_order_code ON sessions (pool_number, order_code)
    WHERE order_code IS NOT NULL AND status IN ('open', 'grace');

ALTER TABLE participants ADD COLUMN by_code boolean NOT NULL DEFAULT false;
DROP INDEX participants_held_pair;
CREATE UNIQUE INDEX participants_held_pair ON participants (number_idx, pool_number) WHERE holds AND NOT by_code;
CREATE INDEX participants_by_code ON participants (number_idx, pool_number) WHERE holds AND by_code;

CREATE TABLE order_code_failures (
    id           bigserial PRIMARY KEY,
    number_idx   bytea NOT NULL,
    pool_number  text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_code_failures_caller ON order_code_failures (number_idx, pool_number, at);
CREATE INDEX order_code_failures_at ON order_code_failures (at);

ALTER TABLE calls DROP CONSTRAINT calls_state_check;
ALTER TABLE calls ADD CONSTRAINT calls_state_check CHECK (state IN (
    'routing', 'entering_code', 'ringing', 'connected', 'announcing', 'ended'));
ALTER TABLE calls DROP CONSTRAINT calls_outcome_check;
ALTER TABLE calls ADD CONSTRAINT calls_outcome_check CHECK (outcome IN (
    'answered', 'busy', 'no_answer', 'rejected', 'failed',
    'caller_cancelled', 'unknown_caller', 'session_closed', 'blocked', 'call_limit', 'quiet_hours',
    'unreachable', 'wrong_code', 'locked_out'));
