-- Session opens in batches (issue 14: 1,000 opens/s on two cores). Opens that arrive while
-- earlier ones' statements run wait, and go to the database together in one statement
-- (bridge.store.sessions: up to 16 a statement): one round trip, one transaction and one
-- commit for all of them instead of one each. Measured through the HTTP API, 32 opens in
-- flight, 2 database connections: about 9 opens a statement, and the bridge's and Postgres's
-- CPU per open a fifth to a third lower.
--
-- Each open is maskbridge_open_session (027, 028), unchanged, in a subtransaction of its own:
-- one that fails (a racing open took the pair's number, a deadlock, a check) comes back as
-- its SQLSTATE, constraint and message, and the bridge raises for that open alone what it
-- raised before; the others are written. What stops the whole statement (a cancel, a
-- statement timeout, a lost connection: PL/pgSQL's OTHERS does not catch a cancel) stops
-- every open of it, and none is written. An open sees the ones of its batch before it, as
-- if they had committed: two opens of one order in a batch open one session; a pair opened
-- twice holds two numbers.
--
-- A batch holds what its opens locked (their numbers, their rows) until it commits. So that
-- two batches never wait for each other, only a batch's first open waits for a lock, as a
-- lone open did: the others have lock_timeout 1 ms, and one that would have to wait fails
-- (55P03, in its subtransaction, which writes nothing) and goes first in a later batch.
-- (The first opens of two batches can still deadlock, as two lone opens could: Postgres
-- fails one (40P01), and the bridge opens it again.)
--
-- Up to 32 opens a statement: each open that writes is a subtransaction with its own
-- transaction id, and a transaction with more than 64 of those overflows the cache every
-- other backend's snapshot reads (each then looks them up in pg_subtrans).

CREATE FUNCTION maskbridge_open_sessions(
    p_order_id text[], p_courier_id uuid[], p_courier_idx bytea[], p_courier_enc bytea[],
    p_client_id uuid[], p_client_idx bytea[], p_client_enc bytea[], p_session jsonb[], p_ttl integer[],
    p_code_given boolean[],
    OUT outcome text, OUT due text, OUT session sessions, OUT members participants[],
    OUT failed text, OUT failed_constraint text, OUT failed_message text
) RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE
    opened record;
BEGIN
    IF cardinality(p_order_id) > 32 THEN
        RAISE program_limit_exceeded USING MESSAGE = 'at most 32 session opens a statement';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_order_id), 0) LOOP
        IF i = 2 THEN
            PERFORM set_config('lock_timeout', '1ms', true);  -- (for the rest of the transaction)
        END IF;
        outcome := NULL; due := NULL; session := NULL; members := NULL;
        failed := NULL; failed_constraint := NULL; failed_message := NULL;
        BEGIN
            SELECT * INTO opened FROM maskbridge_open_session(
                p_order_id[i], p_courier_id[i], p_courier_idx[i], p_courier_enc[i],
                p_client_id[i], p_client_idx[i], p_client_enc[i], p_session[i], p_ttl[i], p_code_given[i]);
            outcome := opened.outcome; due := opened.due; session := opened.session; members := opened.members;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS failed = RETURNED_SQLSTATE, failed_constraint = CONSTRAINT_NAME,
                                    failed_message = MESSAGE_TEXT;
        END;
        RETURN NEXT;  -- (in the order given)
    END LOOP;
END
$$;
