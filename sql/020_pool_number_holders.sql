-- The allocator's "least loaded" without counting the holders of every active number on
-- every open (issue 14). Each pool number keeps how many participants hold it
-- (pool_numbers.holders); a change to a participant's hold is written as a row of
-- pool_number_holder_changes by a trigger (an insert: no row every open would lock, which
-- a counter updated in place was, and under racing opens that cost lock waits and
-- deadlocks), and the bridges fold those rows into pool_numbers.holders every second
-- (maskbridge_fold_holder_changes). The allocator reads the least loaded numbers from an
-- index on holders, and adds the changes not folded yet for the few numbers that have some.
ALTER TABLE pool_numbers ADD COLUMN holders integer NOT NULL DEFAULT 0;
UPDATE pool_numbers p SET holders = (SELECT count(*) FROM participants h WHERE h.holds AND h.pool_number = p.number);

CREATE TABLE pool_number_holder_changes (
    id      bigserial PRIMARY KEY,
    number  text NOT NULL,
    delta   integer NOT NULL CHECK (delta IN (-1, 1))
);
CREATE INDEX pool_number_holder_changes_number ON pool_number_holder_changes (number);

CREATE FUNCTION maskbridge_note_holder_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.holds THEN
        INSERT INTO pool_number_holder_changes (number, delta) VALUES (OLD.pool_number, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.holds THEN
        INSERT INTO pool_number_holder_changes (number, delta) VALUES (NEW.pool_number, 1);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER participants_holder_added_or_removed AFTER INSERT OR DELETE ON participants
    FOR EACH ROW EXECUTE FUNCTION maskbridge_note_holder_change();
CREATE TRIGGER participants_holder_changed AFTER UPDATE OF holds, pool_number ON participants
    FOR EACH ROW WHEN (OLD.holds IS DISTINCT FROM NEW.holds OR OLD.pool_number IS DISTINCT FROM NEW.pool_number)
    EXECUTE FUNCTION maskbridge_note_holder_change();

-- Folds the changes (those committed: a change of a transaction still running waits for the
-- next fold); safe to run from several bridges at once (a change is deleted, and counted,
-- once). Returns how many changes it folded.
CREATE FUNCTION maskbridge_fold_holder_changes() RETURNS bigint LANGUAGE sql AS $$
    WITH taken AS (DELETE FROM pool_number_holder_changes RETURNING number, delta),
    summed AS (SELECT number, sum(delta) AS delta, count(*) AS n FROM taken GROUP BY number),
    folded AS (UPDATE pool_numbers p SET holders = p.holders + s.delta FROM summed s WHERE p.number = s.number)
    SELECT coalesce(sum(n), 0)::bigint FROM summed
$$;

CREATE INDEX pool_numbers_direct_by_region_load ON pool_numbers (region, holders) WHERE state = 'active' AND mode = 'direct';
CREATE INDEX pool_numbers_direct_by_load ON pool_numbers (holders) WHERE state = 'active' AND mode = 'direct';
