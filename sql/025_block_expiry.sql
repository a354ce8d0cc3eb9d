-- Issue 15: a block may carry an expiry. An expired entry blocks nothing from its expiry on,
-- whether or not housekeeping has deleted it yet: every check reads live_blocked_numbers,
-- the one definition of a block in force.
ALTER TABLE blocked_numbers ADD COLUMN expires_at timestamptz;
CREATE INDEX blocked_numbers_expiry ON blocked_numbers (expires_at) WHERE expires_at IS NOT NULL;
CREATE VIEW live_blocked_numbers AS
    SELECT * FROM blocked_numbers WHERE expires_at IS NULL OR expires_at > now();
