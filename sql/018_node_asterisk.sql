-- Which Asterisk each node's bridge drives (its entity id, unique per Asterisk): a bridge
-- that finds another live node on its own Asterisk refuses to start (two bridges on one
-- Asterisk under one Stasis application would take it from each other).
ALTER TABLE nodes ADD COLUMN asterisk_entity_id text;
