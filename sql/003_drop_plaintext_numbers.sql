-- The Python step after 002 sealed every real number; the plaintext goes.
ALTER TABLE participants DROP COLUMN real_number, DROP COLUMN live;

-- A live participant always holds its pair; a participant that left holds it until the
-- cool-off ends (held_until); a purged one holds nothing.
ALTER TABLE participants
    ADD CONSTRAINT participants_live_holds CHECK (left_at IS NOT NULL OR (holds AND held_until IS NULL)),
    ADD CONSTRAINT participants_cooling_until CHECK (NOT holds OR left_at IS NULL OR held_until IS NOT NULL),
    ADD CONSTRAINT participants_sealed CHECK ((number_idx IS NULL) = (number_enc IS NULL)),
    ADD CONSTRAINT participants_purged CHECK ((purged_at IS NULL) = (number_idx IS NOT NULL));

-- The routing rule, enforced by the database: a (real number, pool number) pair has at
-- most one holder. Live participants always hold, so no real number can have the same pool
-- number in two live sessions, however many opens race; and a pair in cool-off cannot be
-- handed to someone new.
CREATE UNIQUE INDEX participants_held_pair ON participants (number_idx, pool_number) WHERE holds;
-- One live courier and one live client per session.
CREATE UNIQUE INDEX participants_live_role ON participants (session_id, role) WHERE left_at IS NULL;
CREATE INDEX participants_pool_load ON participants (pool_number) WHERE holds;
CREATE INDEX participants_number ON participants (number_idx, joined_at);
CREATE INDEX participants_cooling ON participants (held_until) WHERE holds AND held_until IS NOT NULL;
