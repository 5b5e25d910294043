-- The reconnect backoff ceiling the node's agent declared, in milliseconds;
-- after a restart the coordinator waits this long on top of its usual
-- allowance before it shows the node OFFLINE. Rows written before agents
-- declared it hold NULL and get the default.
ALTER TABLE known_nodes ADD COLUMN max_backoff_ms BIGINT;
