-- The SHA-256 digest (hex) of the node secret that first registered the node
-- id. A later registration must present the same secret. Rows written before
-- secrets existed hold NULL and are claimed by their next registration.
ALTER TABLE known_nodes ADD COLUMN secret_hash TEXT;
