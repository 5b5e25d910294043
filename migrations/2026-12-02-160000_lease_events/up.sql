-- The lease event log behind WatchLeases: every change of a lease the
-- pool reports, written in the transaction that writes the lease's row. Its
-- revisions are its own, apart from node_events', and it is kept by count.
CREATE TABLE lease_events (
    revision         BIGINT NOT NULL PRIMARY KEY,
    lease_generation BIGINT NOT NULL,
    -- granted, renewed, revoked, suspended, resumed, released, expired,
    -- reclaimed or reconciled.
    kind             TEXT   NOT NULL,
    -- The lease after the change: an encoded muster.v1.Lease.
    lease            BLOB   NOT NULL,
    -- For a revocation, the request_id it made room for; otherwise empty.
    revoked_for      TEXT   NOT NULL,
    -- Milliseconds since the Unix epoch, UTC.
    at               BIGINT NOT NULL
);

-- The last lease event revision issued, and the last one pruned: a watch
-- can resume from any revision in [pruned_through, last_revision].
CREATE TABLE lease_event_log (
    id             INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_revision  BIGINT  NOT NULL,
    pruned_through BIGINT  NOT NULL
);
INSERT INTO lease_event_log (id, last_revision, pruned_through) VALUES (1, 0, 0);
