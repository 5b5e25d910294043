ALTER TABLE known_nodes DROP COLUMN gpus;
