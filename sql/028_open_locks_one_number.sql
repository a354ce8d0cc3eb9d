-- Session opens lock their pool number with one index look instead of sixty-four (issue 14:
-- 1,000 opens/s at 1M participants). An open picks among the tier of the least loaded free
-- numbers (up to 64 of them, every one as loaded as the least loaded); it locked one of them
-- with "number = ANY(tier) ... SKIP LOCKED", which reads every number of the tier first
-- (about 140 of the 300 buffer reads of an open, measured at 1M participants). It now
-- tries four of the tier drawn at random, and only if a racing open holds all four, the
-- whole tier as before. The rest of the function is 027's, unchanged.

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

-- (CREATE OR REPLACE resets what ALTER FUNCTION set: set again, see 027.)
ALTER FUNCTION maskbridge_open_session SET plan_cache_mode = force_generic_plan;
