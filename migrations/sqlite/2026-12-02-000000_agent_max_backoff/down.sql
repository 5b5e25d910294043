ALTER TABLE known_nodes DROP COLUMN max_backoff_ms;
