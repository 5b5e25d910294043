// The diesel view of `migrations/`. Keep the two in step.

diesel::table! {
    known_nodes (node_id) {
        node_id -> Text,
        agent_url -> Text,
        boot_id -> Text,
        version -> Text,
        hostname -> Text,
        labels -> Text,
        registered_at -> BigInt,
        last_seen -> BigInt,
        session_generation -> BigInt,
        offline_since -> Nullable<BigInt>,
        secret_hash -> Nullable<Text>,
        max_backoff_ms -> Nullable<BigInt>,
        drained_at -> Nullable<BigInt>,
        drain_reason -> Nullable<Text>,
        left_at -> Nullable<BigInt>,
        gpus -> Text,
    }
}

diesel::table! {
    session_generations (id) {
        id -> Integer,
        last_issued -> BigInt,
    }
}

diesel::table! {
    node_events (revision) {
        revision -> BigInt,
        node_id -> Text,
        kind -> Text,
        reason -> Text,
        node -> Binary,
        at -> BigInt,
    }
}

diesel::table! {
    event_log (id) {
        id -> Integer,
        last_revision -> BigInt,
        pruned_through -> BigInt,
        database_id -> Text,
    }
}

diesel::table! {
    leases (generation) {
        generation -> BigInt,
        request_id -> Text,
        holder -> Text,
        mb -> BigInt,
        priority -> Integer,
        ttl_ms -> BigInt,
        constraints -> Text,
        node_id -> Text,
        gpu_uuid -> Text,
        granted_at -> BigInt,
        expires_at -> BigInt,
        state -> Text,
        revoked_at -> Nullable<BigInt>,
        suspended_at -> Nullable<BigInt>,
        released_at -> Nullable<BigInt>,
        release_reason -> Nullable<Text>,
    }
}

diesel::table! {
    lease_generations (id) {
        id -> Integer,
        last_issued -> BigInt,
    }
}

diesel::table! {
    lease_events (revision) {
        revision -> BigInt,
        lease_generation -> BigInt,
        kind -> Text,
        lease -> Binary,
        revoked_for -> Text,
        at -> BigInt,
    }
}

diesel::table! {
    lease_event_log (id) {
        id -> Integer,
        last_revision -> BigInt,
        pruned_through -> BigInt,
    }
}

diesel::table! {
    node_heartbeats (node_id) {
        node_id -> Text,
        last_seen -> BigInt,
    }
}
