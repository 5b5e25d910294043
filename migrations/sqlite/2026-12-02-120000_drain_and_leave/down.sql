ALTER TABLE known_nodes DROP COLUMN left_at;
ALTER TABLE known_nodes DROP COLUMN drain_reason;
ALTER TABLE known_nodes DROP COLUMN drained_at;
