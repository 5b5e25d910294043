-- The node's GPUs as its agent last reported them: a JSON list, written by
-- every registration and, when the inventory changes, with the batches that
-- write last_seen. Rows from before it hold no GPUs.
ALTER TABLE known_nodes ADD COLUMN gpus TEXT NOT NULL DEFAULT '[]';
