-- Leadership among the coordinators sharing this database: one row, absent
-- until the first campaign. Taken and renewed by conditional updates judged
-- by the server's clock (now()), never a coordinator's. The epoch rises
-- with every takeover and stays on renewal; every write transaction of the
-- leader checks, under a lock that a takeover must wait for, that its epoch
-- still holds an unexpired lease.
CREATE TABLE leadership (
    id         INTEGER     NOT NULL PRIMARY KEY CHECK (id = 1),
    holder     TEXT        NOT NULL,
    url        TEXT        NOT NULL,
    epoch      BIGINT      NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
