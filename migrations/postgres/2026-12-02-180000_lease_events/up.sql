-- The lease event log behind WatchLeases, as migrations/sqlite's
-- 2026-12-02-160000_lease_events makes it (see there for each column).
CREATE TABLE lease_events (
    revision         BIGINT NOT NULL PRIMARY KEY,
    lease_generation BIGINT NOT NULL,
    kind             TEXT   NOT NULL,
    -- An encoded muster.v1.Lease.
    lease            BYTEA  NOT NULL,
    revoked_for      TEXT   NOT NULL,
    at               BIGINT NOT NULL
);

CREATE TABLE lease_event_log (
    id             INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_revision  BIGINT  NOT NULL,
    pruned_through BIGINT  NOT NULL
);
INSERT INTO lease_event_log (id, last_revision, pruned_through) VALUES (1, 0, 0);
