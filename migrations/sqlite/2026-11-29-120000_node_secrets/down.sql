ALTER TABLE known_nodes DROP COLUMN secret_hash;
