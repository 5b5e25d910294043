-- The PostgreSQL schema, the same tables and columns as the SQLite
-- migrations up to 2026-12-02-150000_leases leave (see migrations/sqlite for
-- what each column means). Times are milliseconds since the Unix epoch, UTC.

-- Every node that has ever registered and not yet expired.
CREATE TABLE known_nodes (
    node_id            TEXT    NOT NULL PRIMARY KEY,
    agent_url          TEXT    NOT NULL,
    boot_id            TEXT    NOT NULL,
    version            TEXT    NOT NULL DEFAULT '',
    hostname           TEXT    NOT NULL DEFAULT '',
    labels             TEXT    NOT NULL DEFAULT '{}',
    registered_at      BIGINT  NOT NULL,
    last_seen          BIGINT  NOT NULL,
    session_generation BIGINT  NOT NULL,
    offline_since      BIGINT,
    secret_hash        TEXT,
    max_backoff_ms     BIGINT,
    drained_at         BIGINT,
    drain_reason       TEXT,
    left_at            BIGINT,
    gpus               TEXT    NOT NULL DEFAULT '[]'
);

-- The last session generation issued to any node, by any coordinator that
-- shares this database: generations never decrease fleet-wide.
CREATE TABLE session_generations (
    id          INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_issued BIGINT  NOT NULL
);
INSERT INTO session_generations (id, last_issued) VALUES (1, 0);

-- The revisioned event log behind WatchNodes.
CREATE TABLE node_events (
    revision BIGINT  NOT NULL PRIMARY KEY,
    node_id  TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    -- An encoded muster.v1.Node.
    node     BYTEA   NOT NULL,
    at       BIGINT  NOT NULL
);

CREATE TABLE event_log (
    id             INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_revision  BIGINT  NOT NULL,
    pruned_through BIGINT  NOT NULL,
    database_id    TEXT    NOT NULL
);
INSERT INTO event_log (id, last_revision, pruned_through, database_id)
VALUES (1, 0, 0, replace(gen_random_uuid()::text, '-', ''));

-- VRAM leases, one row per lease the pool still keeps.
CREATE TABLE leases (
    generation     BIGINT  NOT NULL PRIMARY KEY,
    request_id     TEXT    NOT NULL UNIQUE,
    holder         TEXT    NOT NULL,
    mb             BIGINT  NOT NULL,
    priority       INTEGER NOT NULL,
    ttl_ms         BIGINT  NOT NULL,
    constraints    TEXT    NOT NULL,
    node_id        TEXT    NOT NULL,
    gpu_uuid       TEXT    NOT NULL,
    granted_at     BIGINT  NOT NULL,
    expires_at     BIGINT  NOT NULL,
    state          TEXT    NOT NULL,
    revoked_at     BIGINT,
    suspended_at   BIGINT,
    released_at    BIGINT,
    release_reason TEXT
);

CREATE TABLE lease_generations (
    id           INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_issued  BIGINT  NOT NULL
);
INSERT INTO lease_generations (id, last_issued) VALUES (1, 0);
