-- Session opens in batches (issue 14: 1,000 opens/s on two cores), and the open's last resort
-- looks its number up in the index (at the end). Opens that arrive while
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
-- The function refuses more than 32 opens (the bridge sends up to 16): each open that writes
-- is a subtransaction with its own transaction id, and a transaction with more than 64 of
-- those overflows the cache every other backend's snapshot reads (each then looks them up in
-- pg_subtrans).

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

-- And the open's last resort, when racing opens hold every number of its tier: it waited for
-- one drawn at random, "number = v_tier[random()]", which Postgres cannot look up in an index
-- (random() is volatile: it is drawn again for each row), so it read the whole table, locking
-- any row whose own draw matched, and found none about a third of the time (the caller
-- looked again). The number is drawn first now; the rest of the function is 028's.

CREATE OR REPLACE FUNCTION maskbridge_open_session(
    p_order_id text, p_courier_id uuid, p_courier_idx bytea, p_courier_enc bytea,
    p_client_id uuid, p_client_idx bytea, p_client_enc bytea, p_session jsonb, p_ttl integer, p_code_given boolean,
    OUT outcome text, OUT due text, OUT session sessions, OUT members participants[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_pair bytea[] := ARRAY[p_courier_idx, p_client_idx];
    v_region text := p_session->>'region';
    v_by_code boolean := p_session->>'mode' = 'order_code';
    v_held text[];
    v_sticky text;
    v_tier text[];
    v_chosen text;
    v_drawn text;
BEGIN
    IF v_region IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pool_numbers p WHERE p.region = v_region) THEN
        outcome := 'unknown_region';
        RETURN;
    END IF;
    SELECT s.* INTO session FROM sessions s WHERE s.order_id = p_order_id AND s.status = 'open';
    IF FOUND THEN
        outcome := 'open_already';
        due := maskbridge_session_due(session);
        SELECT array_agg(p ORDER BY p.joined_at, p.role) INTO members FROM participants p
        WHERE p.session_id = session.id;
        RETURN;
    END IF;

    IF v_by_code THEN
        -- Shared numbers: the region's first, then the one with the fewest live sessions.
        SELECT p.number INTO v_chosen FROM pool_numbers p
        WHERE p.state = 'active' AND p.mode = 'order_code' AND NOT (p_code_given AND EXISTS (
            SELECT 1 FROM sessions s WHERE s.pool_number = p.number AND s.order_code = p_session->>'order_code'
              AND s.status IN ('open', 'grace')))
        ORDER BY (v_region IS NOT NULL AND p.region IS NOT DISTINCT FROM v_region) DESC,
                 (SELECT count(*) FROM sessions s WHERE s.pool_number = p.number AND s.status IN ('open', 'grace')),
                 random()
        LIMIT 1;
        IF v_chosen IS NULL THEN
            outcome := CASE WHEN EXISTS (SELECT 1 FROM pool_numbers p WHERE p.state = 'active'
                                         AND p.mode = 'order_code') THEN 'code_taken' ELSE 'exhausted' END;
            RETURN;
        END IF;
        -- (FOR SHARE: opens on one shared number do not wait for each other.)
        PERFORM FROM pool_numbers p WHERE p.number = v_chosen AND p.state = 'active' AND p.mode = 'order_code'
        FOR SHARE;
        IF NOT FOUND THEN
            RAISE serialization_failure USING MESSAGE = 'the chosen pool number changed; look again';
        END IF;
    ELSE
        v_held := maskbridge_numbers_held(v_pair);
        -- The pair's last number, when free for both, comes first; locked, waiting if need be.
        SELECT s.pool_number INTO v_sticky FROM participants a
        JOIN participants b ON b.session_id = a.session_id AND b.role <> a.role AND b.number_idx = p_client_idx
        JOIN sessions s ON s.id = a.session_id
        WHERE a.number_idx = p_courier_idx ORDER BY s.created_at DESC LIMIT 1;
        IF v_sticky IS NOT NULL AND v_sticky <> ALL(v_held) THEN
            SELECT p.number INTO v_chosen FROM pool_numbers p
            WHERE p.number = v_sticky AND p.state = 'active' AND p.mode = 'direct' FOR NO KEY UPDATE;
        END IF;
        -- Then the least loaded of the region's free numbers (of any region if none of the
        -- region's is free): read in load order from an index, up to 64 of the least loaded.
        IF v_chosen IS NULL AND v_region IS NOT NULL THEN
            WITH c AS (
                SELECT p.number, p.holders FROM pool_numbers p
                WHERE p.state = 'active' AND p.mode = 'direct' AND p.region = v_region AND p.number <> ALL(v_held)
                ORDER BY p.holders LIMIT 64)
            SELECT array_agg(c.number) INTO v_tier FROM c WHERE c.holders = (SELECT min(holders) FROM c);
        END IF;
        IF v_chosen IS NULL AND v_tier IS NULL THEN
            WITH c AS (
                SELECT p.number, p.holders FROM pool_numbers p
                WHERE p.state = 'active' AND p.mode = 'direct' AND p.number <> ALL(v_held)
                ORDER BY p.holders LIMIT 64)
            SELECT array_agg(c.number) INTO v_tier FROM c WHERE c.holders = (SELECT min(holders) FROM c);
        END IF;
        IF v_chosen IS NULL AND v_tier IS NOT NULL THEN
            -- One of four drawn at random that no racing open has locked (one index look each);
            -- if a racing open holds all four, one of the whole tier; if every one is locked,
            -- wait for one. (Checked again once locked: a retire or a mode change that committed
            -- meanwhile leaves nothing found, and the caller looks again.)
            SELECT p.number INTO v_chosen FROM pool_numbers p
            WHERE p.number = ANY(ARRAY(SELECT v_tier[1 + floor(random() * cardinality(v_tier))::int]
                                       FROM generate_series(1, 4)))
              AND p.state = 'active' AND p.mode = 'direct'
            ORDER BY random() LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED;
            IF v_chosen IS NULL THEN
                SELECT p.number INTO v_chosen FROM pool_numbers p
                WHERE p.number = ANY(v_tier) AND p.state = 'active' AND p.mode = 'direct'
                ORDER BY random() LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED;
            END IF;
            IF v_chosen IS NULL THEN
                -- (Drawn first: random() in the WHERE is drawn again for every row, a scan of
                -- the whole table that finds none of them a third of the time.)
                v_drawn := v_tier[1 + floor(random() * cardinality(v_tier))::int];
                SELECT p.number INTO v_chosen FROM pool_numbers p
                WHERE p.number = v_drawn AND p.state = 'active' AND p.mode = 'direct' FOR NO KEY UPDATE;
                IF v_chosen IS NULL THEN
                    RAISE serialization_failure USING MESSAGE = 'the chosen pool number changed; look again';
                END IF;
            END IF;
        END IF;
        IF v_chosen IS NULL THEN
            outcome := 'exhausted';
            RETURN;
        END IF;
        -- Holds that no longer count: cool-offs that ended, and the pair's own cooling holds on
        -- this number (a pair may come back to its number at once).
        UPDATE participants h SET holds = false
        WHERE h.number_idx = ANY(v_pair) AND h.holds AND NOT h.by_code AND h.left_at IS NOT NULL
          AND (h.held_until <= now() OR (h.pool_number = v_chosen AND EXISTS (
              SELECT 1 FROM participants o WHERE o.session_id = h.session_id AND o.role <> h.role
                AND o.number_idx = ANY(v_pair) AND o.number_idx <> h.number_idx)));
    END IF;

    -- The session's own columns by name from p_session, then what the open decides.
    session := jsonb_populate_record(NULL::sessions, p_session);
    session.id := gen_random_uuid();
    session.order_id := p_order_id;
    session.pool_number := v_chosen;
    session.status := 'open';
    session.mode := CASE WHEN v_by_code THEN 'order_code' ELSE 'direct' END;
    session.created_at := now();
    session.last_activity_at := now();
    session.expires_at := now() + make_interval(secs => p_ttl);
    -- One statement for the three inserts (the foreign keys are checked at its end). The
    -- participants in index order: two opens that share both people in opposite roles take
    -- the pair locks in the same order, and one waits for the other.
    WITH added_session AS (
        INSERT INTO sessions SELECT session.*
    ), opened AS (
        -- (who opened it, the API token's name or admin:<user>, comes in p_session's "token":
        -- kept out of the event's detail and of the session row)
        INSERT INTO session_events (session_id, kind, detail, token)
        VALUES (session.id, 'opened', (p_session - 'order_code' - 'token') || jsonb_build_object(
            'pool_number', v_chosen, 'ttl_seconds', p_ttl, 'mode', session.mode), p_session->>'token')
    ), added AS (
        INSERT INTO participants (id, session_id, role, number_idx, number_enc, pool_number, by_code)
        SELECT m.id, session.id, m.role, m.idx, m.enc, v_chosen, v_by_code
        FROM (VALUES (p_courier_id, 'courier', p_courier_idx, p_courier_enc),
                     (p_client_id, 'client', p_client_idx, p_client_enc)) AS m(id, role, idx, enc)
        ORDER BY m.idx
        RETURNING participants
    )
    SELECT array_agg(a.participants ORDER BY (a.participants).joined_at, (a.participants).role) INTO members
    FROM added a;
    outcome := 'opened';
END
$$;

-- (CREATE OR REPLACE resets what ALTER FUNCTION set: set again, see 027.)
ALTER FUNCTION maskbridge_open_session SET plan_cache_mode = force_generic_plan;
