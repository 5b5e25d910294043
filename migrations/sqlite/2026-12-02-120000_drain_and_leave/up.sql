-- Set while an operator has drained the node: when it was first drained
-- and why. Registration keeps them; expiry and removal delete them with the
-- row.
ALTER TABLE known_nodes ADD COLUMN drained_at BIGINT;
ALTER TABLE known_nodes ADD COLUMN drain_reason TEXT;
-- Set when the node's agent left on purpose (a graceful shutdown); the
-- node reloads LEFT and expires from this moment. Registration clears it.
ALTER TABLE known_nodes ADD COLUMN left_at BIGINT;
