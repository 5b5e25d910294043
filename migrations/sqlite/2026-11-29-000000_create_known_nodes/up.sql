-- Every node that has ever registered and not yet expired.
-- Times are milliseconds since the Unix epoch, UTC.
CREATE TABLE known_nodes (
    node_id            TEXT    NOT NULL PRIMARY KEY,
    agent_url          TEXT    NOT NULL,
    boot_id            TEXT    NOT NULL,
    version            TEXT    NOT NULL DEFAULT '',
    hostname           TEXT    NOT NULL DEFAULT '',
    -- JSON object of string to string.
    labels             TEXT    NOT NULL DEFAULT '{}',
    registered_at      BIGINT  NOT NULL,
    last_seen          BIGINT  NOT NULL,
    -- Increases with every registration; guards writes from superseded sessions.
    session_generation BIGINT  NOT NULL,
    -- Set while the node is offline, so expiry survives coordinator restarts.
    offline_since      BIGINT
);

-- The last session generation issued to any node. Generations are issued
-- fleet-wide and this row outlives expired nodes, so a node id registered
-- again after expiry still gets a generation above any it ever held.
CREATE TABLE session_generations (
    id          INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_issued BIGINT  NOT NULL
);
INSERT INTO session_generations (id, last_issued) VALUES (1, 0);
