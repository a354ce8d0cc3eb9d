-- A session open in one round trip (issue 14: 1,000 opens/s on two cores). An open was about
-- sixteen round trips (the order's open session, candidates, then a transaction of seven
-- statements, then the session read back), and its candidates query summed every pending
-- holder change (020) and found the pair's holds by scanning every live hold.
--
-- 1. pool_numbers.holders is exact at every commit: statement triggers on participants add
--    each statement's changes in place (one update per number a statement touches; an open's
--    two participants are one statement, so one update). The changes table of 020 and its
--    fold go. Racing opens do not deadlock on it: an open locks its number FOR NO KEY UPDATE
--    before it writes (never FOR SHARE, then an update: two of those deadlock), picking among
--    the least loaded ones it finds unlocked (SKIP LOCKED), so racing opens spread out
--    instead of queueing on one row. A retire (an UPDATE) and a mode change (FOR UPDATE) wait
--    for it, and it for them. Holds of order-code participants are not counted: their shared
--    numbers are not chosen by load, and would be rows every order-code open updates.
-- 2. maskbridge_open_session does all of an open in one statement and returns what it wrote
--    (or the order's open session, or why it could not open): see below.

DROP TRIGGER participants_holder_added_or_removed ON participants;
DROP TRIGGER participants_holder_changed ON participants;
DROP FUNCTION maskbridge_note_holder_change();
DROP FUNCTION maskbridge_fold_holder_changes();
DROP TABLE pool_number_holder_changes;

LOCK TABLE participants IN SHARE MODE;  -- (no hold changes while the counts are taken)
UPDATE pool_numbers p SET holders = (
    SELECT count(*) FROM participants h WHERE h.holds AND NOT h.by_code AND h.pool_number = p.number);

-- An insert of participants (an open's two, in one statement) is counted once per number and
-- statement (a transition table); an update or a delete, per row, and only when it changes a
-- hold (the WHEN is checked without running the function: the many updates of participants
-- that change no hold cost nothing here).
CREATE FUNCTION maskbridge_count_inserted_holders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pool_numbers p SET holders = p.holders + d.n
    FROM (SELECT pool_number, count(*) AS n FROM new_rows WHERE holds AND NOT by_code GROUP BY pool_number) d
    WHERE p.number = d.pool_number;
    RETURN NULL;
END
$$;
CREATE FUNCTION maskbridge_count_changed_holder() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.holds AND NOT OLD.by_code THEN
        UPDATE pool_numbers SET holders = holders - 1 WHERE number = OLD.pool_number;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.holds AND NOT NEW.by_code THEN
        UPDATE pool_numbers SET holders = holders + 1 WHERE number = NEW.pool_number;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER participants_holders_inserted AFTER INSERT ON participants
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION maskbridge_count_inserted_holders();
CREATE TRIGGER participants_holder_deleted AFTER DELETE ON participants
    FOR EACH ROW WHEN (OLD.holds AND NOT OLD.by_code) EXECUTE FUNCTION maskbridge_count_changed_holder();
CREATE TRIGGER participants_holder_changed AFTER UPDATE ON participants
    FOR EACH ROW WHEN ((OLD.holds AND NOT OLD.by_code) IS DISTINCT FROM (NEW.holds AND NOT NEW.by_code)
                       OR (OLD.holds AND NOT OLD.by_code AND OLD.pool_number IS DISTINCT FROM NEW.pool_number))
    EXECUTE FUNCTION maskbridge_count_changed_holder();

-- The holds of a number, by number: what a look at one number's holders reads. Its predicate
-- says "pool_number IS NOT NULL" (always true) so that only a query naming a pool number
-- can use it: a look for the holds of a person (by number_idx, below) could, and did, when
-- the statistics were taken before the holds were there (a history imported at once; the
-- bench): it scanned every live hold, at every open. Those now read participants_held_pair.
DROP INDEX participants_pool_load;
CREATE INDEX participants_pool_load ON participants (pool_number) WHERE holds AND pool_number IS NOT NULL;
-- Likewise the open sessions by expiry (read for the earliest one): the look for an order's
-- open session scanned every open one, where sessions_one_open_per_order finds it.
DROP INDEX sessions_open_expiry;
CREATE INDEX sessions_open_expiry ON sessions (expires_at) WHERE status = 'open' AND expires_at IS NOT NULL;

-- The pool numbers the pair (two blind indexes) may not take: those either holds (live or
-- in a cool-off not over), except the pair's own cooling holds from a session they had
-- together. Read from the hold indexes (participants_held_pair, participants_by_code):
-- as many rows as the two hold, whatever the size of the history.
-- (plpgsql, not sql: its plan is kept, where a SQL function called from plpgsql is planned
-- again at every call.)
CREATE FUNCTION maskbridge_numbers_held(pair bytea[]) RETURNS text[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(h.pool_number), '{}') FROM (
        SELECT * FROM participants WHERE number_idx = ANY(pair) AND holds AND NOT by_code
        UNION ALL
        SELECT * FROM participants WHERE number_idx = ANY(pair) AND holds AND by_code
    ) h
    WHERE (h.held_until IS NULL OR h.held_until > now())
      AND NOT (h.left_at IS NOT NULL AND EXISTS (
          SELECT 1 FROM participants o WHERE o.session_id = h.session_id AND o.role <> h.role
            AND o.number_idx = ANY(pair) AND o.number_idx <> h.number_idx)));
END
$$;

-- Opens the session of order p_order_id between the courier and the client (participant id,
-- blind index and number sealed for that row, each), or finds the one open already. p_session holds the session's own
-- columns by name (region, idle_timeout_seconds, grace_seconds, mode, order_code and every
-- term: bridge/terms.py), p_ttl its seconds to live. p_code_given: the order code is the
-- order system's own (an order-code number where a live session has it is not taken; a
-- code of our own that meets another session's is drawn again by the caller). Returns one row:
--   outcome 'opened': the session and its participants as written;
--   'open_already': the order's open session, its participants, and whether it is due
--     to end (maskbridge_session_due): the caller ends it, or checks it is the same people;
--   'unknown_region': no pool number has p_session's region;
--   'exhausted': no active number is free for the pair (or no order-code number is active);
--   'code_taken': every active order-code number has a live session with the given code.
-- Raises what a racing open causes (unique violations: participants_held_pair,
-- sessions_one_open_per_order, sessions_live_order_code; a deadlock): nothing is written
-- then, and the caller looks again.
CREATE FUNCTION maskbridge_open_session(
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
            -- One of them at random that no racing open has locked; if every one is, wait for
            -- one. (Checked again once locked: a retire or a mode change that committed
            -- meanwhile leaves nothing found, and the caller looks again.)
            SELECT p.number INTO v_chosen FROM pool_numbers p
            WHERE p.number = ANY(v_tier) AND p.state = 'active' AND p.mode = 'direct'
            ORDER BY random() LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED;
            IF v_chosen IS NULL THEN
                SELECT p.number INTO v_chosen FROM pool_numbers p
                WHERE p.number = v_tier[1 + floor(random() * cardinality(v_tier))::int]
                  AND p.state = 'active' AND p.mode = 'direct' FOR NO KEY UPDATE;
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
-- Plans kept once made (every statement above has one good plan whatever its parameters):
-- planning them again at every open was a fifth of its time in Postgres.
ALTER FUNCTION maskbridge_open_session SET plan_cache_mode = force_generic_plan;
