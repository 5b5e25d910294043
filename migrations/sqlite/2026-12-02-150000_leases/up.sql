-- VRAM leases. One row per lease the pool still keeps, written (replaced)
-- on every change in the transaction that acknowledges it; deleted once the
-- pool forgets a released lease.
CREATE TABLE leases (
    -- The lease's id is made from its generation (lease-<generation>).
    generation     BIGINT  NOT NULL PRIMARY KEY,
    request_id     TEXT    NOT NULL UNIQUE,
    holder         TEXT    NOT NULL,
    mb             BIGINT  NOT NULL,
    priority       INTEGER NOT NULL,
    ttl_ms         BIGINT  NOT NULL,
    -- The constraints it was asked with, as JSON:
    -- {"node_id": ..., "gpu_uuid": ..., "label_selector": "k=v,..."}.
    constraints    TEXT    NOT NULL,
    node_id        TEXT    NOT NULL,
    gpu_uuid       TEXT    NOT NULL,
    -- Milliseconds since the Unix epoch, UTC.
    granted_at     BIGINT  NOT NULL,
    expires_at     BIGINT  NOT NULL,
    -- active, revoked, suspended or released.
    state          TEXT    NOT NULL,
    revoked_at     BIGINT,
    suspended_at   BIGINT,
    released_at    BIGINT,
    release_reason TEXT
);

-- The highest lease generation ever issued, kept when leases are deleted,
-- so fencing tokens never decrease across restarts.
CREATE TABLE lease_generations (
    id           INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_issued  BIGINT  NOT NULL
);
INSERT INTO lease_generations (id, last_issued) VALUES (1, 0);
