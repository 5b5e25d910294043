-- The revisioned event log behind WatchNodes. Every change of a node takes
-- the next fleet-wide revision and is written in the transaction that
-- changes its row, so the log and known_nodes never disagree.
CREATE TABLE node_events (
    revision BIGINT  NOT NULL PRIMARY KEY,
    node_id  TEXT    NOT NULL,
    -- 'changed' or 'removed'.
    kind     TEXT    NOT NULL,
    -- What happened: registered, online, offline, left, drained, ...
    reason   TEXT    NOT NULL,
    -- The node after the change (as it was, when removed): an encoded
    -- muster.v1.Node.
    node     BLOB    NOT NULL,
    -- Milliseconds since the Unix epoch, UTC.
    at       BIGINT  NOT NULL
);

-- The last revision issued, and the last one pruned from the history: a
-- watch can resume from any revision in [pruned_through, last_revision].
-- database_id is random once per database, so a watcher can tell that the
-- database was replaced.
CREATE TABLE event_log (
    id            INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_revision BIGINT  NOT NULL,
    pruned_through BIGINT NOT NULL,
    database_id   TEXT    NOT NULL
);
INSERT INTO event_log (id, last_revision, pruned_through, database_id)
VALUES (1, 0, 0, lower(hex(randomblob(16))));
