-- Heartbeat times, apart from known_nodes: a flush of a whole fleet's times
-- rewrites these narrow rows (a few dozen bytes each) instead of the pages
-- of known_nodes, which mostly hold each node's GPU inventory. A node's
-- last_seen is the later of its known_nodes.last_seen (set when it
-- registers) and its time here.
CREATE TABLE node_heartbeats (
    node_id   TEXT   NOT NULL PRIMARY KEY,
    -- Milliseconds since the Unix epoch, UTC.
    last_seen BIGINT NOT NULL
) WITHOUT ROWID;
