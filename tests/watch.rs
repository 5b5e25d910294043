//! The event log and `WatchNodes` through real processes: a watch kept
//! across a fleet's churn and a coordinator's SIGKILL and restart
//! reproduces `ListNodes`; the database holds an event for every row's
//! latest state; pruned revisions are refused and `muster nodes watch`
//! lists again; bookmarks arrive; the admin token guards the watch.

mod common;

use std::{
    collections::BTreeMap,
    fs::File,
    path::Path,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl, SqliteConnection, sql_types};
use muster::proto::{self, NodeEventKind, NodeState};
use nix::sys::signal::Signal;
use prost::Message;
use tokio::task::JoinHandle;
use tonic::Code;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const FLEET: usize = 50;
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

fn watch_timing() -> Vec<&'static str> {
    [FAST_TIMING, &["--watch-bookmark-interval", "300ms"]].concat()
}

fn name(i: usize) -> String {
    format!("w{i:02}")
}

/// What a watcher has received, across every stream it opened.
#[derive(Default)]
struct Seen {
    events: Vec<proto::NodeEvent>,
    /// Statuses that ended a stream (or refused to open one).
    interruptions: Vec<String>,
    streams: usize,
}

impl Seen {
    fn last_revision(&self) -> u64 {
        self.events
            .iter()
            .rev()
            .find(|e| e.kind() != NodeEventKind::Snapshot)
            .map_or(0, |e| e.revision)
    }

    fn latest_reason(&self, node_id: &str) -> Option<String> {
        self.events
            .iter()
            .rev()
            .find(|e| e.node.as_ref().is_some_and(|n| n.node_id == node_id))
            .map(|e| e.reason.clone())
    }
}

/// A test-side watcher that resumes from its last revision whenever its
/// stream ends, as `muster nodes watch` does.
fn spawn_watcher(url: String) -> (Arc<Mutex<Seen>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let task = tokio::spawn(async move {
        for _ in 0..2_000 {
            let since = recorder.lock().unwrap().last_revision();
            let interruption = match connect(&url).await {
                Err(error) => error.to_string(),
                Ok(mut client) => {
                    match client
                        .watch_nodes(proto::WatchNodesRequest {
                            since_revision: since,
                        })
                        .await
                    {
                        Err(status) => format!("{:?}: {}", status.code(), status.message()),
                        Ok(stream) => {
                            recorder.lock().unwrap().streams += 1;
                            let mut stream = stream.into_inner();
                            loop {
                                match stream.message().await {
                                    Ok(Some(event)) => recorder.lock().unwrap().events.push(event),
                                    Ok(None) => break "ended without a status".to_owned(),
                                    Err(status) => {
                                        break format!("{:?}: {}", status.code(), status.message());
                                    }
                                }
                            }
                        }
                    }
                }
            };
            recorder.lock().unwrap().interruptions.push(interruption);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (seen, task)
}

/// The fleet as a sequence of events leaves it, checking on the way that
/// revisions follow one another with no gap and no repeat.
fn apply(events: &[proto::NodeEvent]) -> BTreeMap<String, proto::Node> {
    let mut nodes = BTreeMap::new();
    let mut revision: Option<u64> = None;
    for event in events {
        match event.kind() {
            NodeEventKind::Snapshot => {
                let node = event
                    .node
                    .clone()
                    .expect("a snapshot event carries its node");
                nodes.insert(node.node_id.clone(), node);
            }
            NodeEventKind::SnapshotEnd => revision = Some(event.revision),
            NodeEventKind::Bookmark => {
                assert_eq!(
                    Some(event.revision),
                    revision,
                    "a bookmark names the last revision sent"
                );
            }
            NodeEventKind::Changed | NodeEventKind::Removed => {
                let expected = revision.map_or(event.revision, |r| r + 1);
                assert_eq!(event.revision, expected, "revisions follow one another");
                revision = Some(event.revision);
                let node = event.node.clone().expect("a change carries its node");
                if event.kind() == NodeEventKind::Removed {
                    nodes.remove(&node.node_id);
                } else {
                    nodes.insert(node.node_id.clone(), node);
                }
            }
            NodeEventKind::Unspecified => panic!("an event without a kind: {event:?}"),
        }
    }
    nodes
}

/// What the event log carries of a node. `last_seen` is left out: it is
/// flushed in batches, and a heartbeat that changes nothing is no event.
/// `last_probe_error` is left out: it lives in memory only. Times are kept
/// to the millisecond the database stores.
fn comparable(node: &proto::Node) -> proto::Node {
    let millis = |t: &Option<prost_types::Timestamp>| {
        t.map(|t| prost_types::Timestamp {
            seconds: t.seconds,
            nanos: t.nanos / 1_000_000 * 1_000_000,
        })
    };
    proto::Node {
        last_seen: None,
        last_probe_error: String::new(),
        registered_at: millis(&node.registered_at),
        offline_since: millis(&node.offline_since),
        drained_at: millis(&node.drained_at),
        ..node.clone()
    }
}

fn comparable_fleet<'a>(nodes: impl IntoIterator<Item = &'a proto::Node>) -> Vec<proto::Node> {
    let mut nodes: Vec<proto::Node> = nodes.into_iter().map(comparable).collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    nodes
}

/// Waits until the events applied equal what `ListNodes` shows.
async fn wait_for_events_to_match_list(url: &str, seen: &Mutex<Seen>, what: &str) {
    let mut last_difference = String::new();
    let matched = tokio::time::timeout(SETTLE_DEADLINE, async {
        loop {
            if let Some(listed) = list_nodes(url).await {
                let applied = apply(&seen.lock().unwrap().events);
                let listed = comparable_fleet(&listed);
                let applied = comparable_fleet(applied.values());
                if listed == applied {
                    return;
                }
                last_difference = describe_difference(&listed, &applied);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        matched.is_ok(),
        "{what}: events never matched ListNodes: {last_difference}"
    );
}

fn describe_difference(listed: &[proto::Node], applied: &[proto::Node]) -> String {
    let listed: BTreeMap<&str, &proto::Node> =
        listed.iter().map(|n| (n.node_id.as_str(), n)).collect();
    let applied: BTreeMap<&str, &proto::Node> =
        applied.iter().map(|n| (n.node_id.as_str(), n)).collect();
    let mut lines = Vec::new();
    for id in listed.keys().chain(applied.keys()) {
        let (l, a) = (listed.get(id), applied.get(id));
        if l != a {
            lines.push(format!("{id}: listed {l:?}, from events {a:?}"));
        }
    }
    lines.dedup();
    lines.join("\n")
}

#[derive(QueryableByName)]
struct RowAndEvent {
    #[diesel(sql_type = sql_types::Text)]
    node_id: String,
    #[diesel(sql_type = sql_types::BigInt)]
    session_generation: i64,
    #[diesel(sql_type = sql_types::Nullable<sql_types::BigInt>)]
    offline_since: Option<i64>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::BigInt>)]
    left_at: Option<i64>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Text>)]
    drain_reason: Option<String>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Text>)]
    kind: Option<String>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Binary>)]
    node: Option<Vec<u8>>,
}

/// Reads the database of a coordinator that was SIGKILLed: every row's
/// latest event must describe the row as it is. An event written in a
/// transaction of its own could be missing, or describe an older row.
fn assert_every_row_has_its_event(db: &Path) -> usize {
    let query = diesel::sql_query(
        "SELECT n.node_id, n.session_generation, n.offline_since, n.left_at, n.drain_reason,
                e.kind, e.node
         FROM known_nodes n
         LEFT JOIN node_events e ON e.revision =
             (SELECT max(revision) FROM node_events WHERE node_id = n.node_id)",
    );
    let rows: Vec<RowAndEvent> = match store_database(db) {
        muster::config::Database::Sqlite(path) => query
            .load(&mut SqliteConnection::establish(&path.display().to_string()).unwrap())
            .unwrap(),
        muster::config::Database::Postgres(url) => query
            .load(&mut PgConnection::establish(url.expose()).unwrap())
            .unwrap(),
    };
    for row in &rows {
        let id = &row.node_id;
        assert_eq!(row.kind.as_deref(), Some("changed"), "{id}: latest event");
        let node = proto::Node::decode(row.node.as_deref().unwrap()).unwrap();
        assert_eq!(node.node_id, *id);
        assert_eq!(
            node.session_generation as i64, row.session_generation,
            "{id}"
        );
        assert_eq!(node.drained, row.drain_reason.is_some(), "{id}");
        let expected = match (row.left_at, row.offline_since) {
            (Some(_), _) => vec![NodeState::Left],
            (None, Some(_)) => vec![NodeState::Offline],
            // UNKNOWN when the coordinator stopped before proving it alive.
            (None, None) => vec![NodeState::Online, NodeState::Unknown],
        };
        assert!(
            expected.contains(&node.state()),
            "{id}: row {expected:?}, event {:?}",
            node.state()
        );
    }
    rows.len()
}

/// `muster nodes watch --output json`, its stdout kept in `out`.
fn start_cli_watch(url: &str, out: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["nodes", "watch", "--output", "json", "--coordinator", url])
        .args(extra)
        .stdout(File::create(out).unwrap())
        .stderr(File::create(out.with_extension("stderr")).unwrap())
        .spawn()
        .expect("spawn muster nodes watch")
}

/// The events `muster nodes watch --output json` printed, as JSON values.
fn cli_events(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Node id to (state, drained) as the CLI's events leave the fleet.
fn apply_cli(events: &[serde_json::Value]) -> BTreeMap<String, (String, bool)> {
    let mut nodes = BTreeMap::new();
    for event in events {
        let node = &event["node"];
        match event["kind"].as_str().unwrap() {
            "snapshot" | "changed" => {
                let id = node["node_id"].as_str().unwrap().to_owned();
                let state = node["state"].as_str().unwrap().to_owned();
                nodes.insert(id, (state, node["drained"].as_bool().unwrap()));
            }
            "removed" => {
                nodes.remove(node["node_id"].as_str().unwrap());
            }
            _ => {}
        }
    }
    nodes
}

async fn a_watch_across_churn_and_a_coordinator_restart_reproduces_list_nodes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "watch::a_watch_across_churn_and_a_coordinator_restart_reproduces_list_nodes",
    ) else {
        return;
    };
    let db = database.db.clone();
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", &watch_timing());
    let url = coordinator.url();
    let listen = coordinator.process.address.to_string();
    let (seen, watcher) = spawn_watcher(url.clone());
    let cli_out = dir.path().join("cli-watch.json");
    let mut cli = start_cli_watch(&url, &cli_out, &[]);

    let mut agents: Vec<Option<Process>> = (0..FLEET)
        .map(|i| Some(start_agent(&url, &name(i), &dir.path().join(name(i)))))
        .collect();
    let everyone: Vec<String> = (0..FLEET).map(name).collect();
    let ids: Vec<&str> = everyone.iter().map(String::as_str).collect();
    wait_for_state(&url, &ids, NodeState::Online, SETTLE_DEADLINE).await;
    wait_for_events_to_match_list(&url, &seen, "after 50 joined").await;

    // Ten leave, ten die, one is drained.
    for agent in &mut agents[0..10] {
        let status = agent
            .take()
            .unwrap()
            .stop_with(Signal::SIGTERM, START_DEADLINE);
        assert!(status.success(), "{status:?}");
    }
    for agent in &mut agents[10..20] {
        agent.take().unwrap().kill();
    }
    let mut client = connect(&url).await.unwrap();
    client
        .drain_node(proto::DrainNodeRequest {
            node_id: name(20),
            reason: "fan".to_owned(),
        })
        .await
        .unwrap();
    wait_for(
        "the leaves, deaths and drain to be events",
        SETTLE_DEADLINE,
        || {
            let seen = seen.lock().unwrap();
            let done = (0..10).all(|i| seen.latest_reason(&name(i)).as_deref() == Some("left"))
                && (10..20).all(|i| seen.latest_reason(&name(i)).as_deref() == Some("offline"))
                && seen.latest_reason(&name(20)).as_deref() == Some("drained");
            async move { done.then_some(()) }
        },
    )
    .await;
    wait_for_events_to_match_list(&url, &seen, "after leaves, deaths and a drain").await;

    // The coordinator dies in the middle of it all.
    coordinator.process.kill();
    let rows = assert_every_row_has_its_event(&db);
    assert_eq!(rows, FLEET);
    let streams_before = seen.lock().unwrap().streams;
    let coordinator = Coordinator::restart(&db, &listen, &watch_timing());

    // Some of the departed come back; one that left is removed for good.
    for i in (0..5).chain(10..15) {
        agents[i] = Some(start_agent(&url, &name(i), &dir.path().join(name(i))));
    }
    let mut client = connect(&url).await.unwrap();
    client
        .remove_node(proto::RemoveNodeRequest { node_id: name(5) })
        .await
        .unwrap();
    let online: Vec<&str> = ids[0..5]
        .iter()
        .chain(&ids[10..15])
        .chain(&ids[20..])
        .copied()
        .collect();
    wait_for_state(&url, &online, NodeState::Online, SETTLE_DEADLINE).await;
    wait_for_state(&url, &ids[6..10], NodeState::Left, SETTLE_DEADLINE).await;
    wait_for_state(&url, &ids[15..20], NodeState::Offline, SETTLE_DEADLINE).await;
    wait_for_events_to_match_list(&url, &seen, "after the restart and the returns").await;

    // 40 agents heartbeat every 500 ms meanwhile: no event comes of it.
    let settled = seen.lock().unwrap().last_revision();
    hold_for("no event from heartbeats", Duration::from_secs(2), || {
        let now = seen.lock().unwrap().last_revision();
        async move {
            if now == settled {
                Ok(())
            } else {
                Err(format!("revision moved from {settled} to {now}"))
            }
        }
    })
    .await;

    let listed = list_nodes(&url).await.unwrap();
    assert_eq!(listed.len(), FLEET - 1);
    assert!(listed.iter().all(|n| n.node_id != name(5)), "removed");
    let drained = listed.iter().find(|n| n.node_id == name(20)).unwrap();
    assert!(
        drained.drained && drained.drain_reason == "fan",
        "{drained:?}"
    );

    let (events, streams, database_ids) = {
        let seen = seen.lock().unwrap();
        let ids: std::collections::BTreeSet<String> =
            seen.events.iter().map(|e| e.database_id.clone()).collect();
        (seen.events.clone(), seen.streams, ids)
    };
    assert!(
        streams > streams_before,
        "the watch was resumed after the restart"
    );
    assert_eq!(
        database_ids.len(),
        1,
        "one database throughout: {database_ids:?}"
    );
    let snapshots = events
        .iter()
        .filter(|e| e.kind() == NodeEventKind::SnapshotEnd)
        .count();
    assert_eq!(
        snapshots, 1,
        "the resumed watch replayed instead of listing again"
    );
    let reasons: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e.reason.as_str()).collect();
    // Not "online": after the restart, agents re-registering may beat the
    // probes that would have proven them alive.
    for reason in [
        "registered",
        "left",
        "offline",
        "drained",
        "reloaded",
        "removed",
    ] {
        assert!(
            reasons.contains(reason),
            "no {reason:?} event in {reasons:?}"
        );
    }
    assert!(
        events.iter().any(|e| e.kind() == NodeEventKind::Bookmark),
        "bookmarks arrive"
    );

    // A fresh snapshot agrees with the history replayed.
    let mut fresh = connect(&url)
        .await
        .unwrap()
        .watch_nodes(proto::WatchNodesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = Vec::new();
    loop {
        let event = fresh.message().await.unwrap().unwrap();
        let end = event.kind() == NodeEventKind::SnapshotEnd;
        snapshot.push(event);
        if end {
            break;
        }
    }
    let at = snapshot.last().unwrap().revision;
    wait_for(
        "the watcher to reach the fresh snapshot's revision",
        SETTLE_DEADLINE,
        || {
            let reached = seen.lock().unwrap().last_revision() >= at;
            async move { reached.then_some(()) }
        },
    )
    .await;
    let through_snapshot: Vec<proto::NodeEvent> = seen
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.revision <= at)
        .cloned()
        .collect();
    assert_eq!(
        comparable_fleet(apply(&snapshot).values()),
        comparable_fleet(apply(&through_snapshot).values()),
        "the snapshot at {at} and the history through {at} agree"
    );

    // `muster nodes watch` resumed by itself and tells the same story.
    let final_revision = seen.lock().unwrap().last_revision();
    wait_for("the CLI watch to catch up", SETTLE_DEADLINE, || {
        let caught_up = cli_events(&cli_out)
            .iter()
            .filter_map(|e| e["revision"].as_u64())
            .max()
            .is_some_and(|r| r >= final_revision);
        async move { caught_up.then_some(()) }
    })
    .await;
    let _ = cli.kill();
    let _ = cli.wait();
    let cli_fleet = apply_cli(&cli_events(&cli_out));
    let expected: BTreeMap<String, (String, bool)> = apply(&events)
        .into_values()
        .map(|n| {
            let state = format!("{:?}", n.state()).to_uppercase();
            (n.node_id, (state, n.drained))
        })
        .collect();
    assert_eq!(cli_fleet, expected);
    let cli_stderr = std::fs::read_to_string(cli_out.with_extension("stderr")).unwrap();
    assert!(
        cli_stderr.contains("resuming after revision"),
        "{cli_stderr}"
    );

    watcher.abort();
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pruned_revision_is_out_of_range_and_the_cli_lists_the_fleet_again() {
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        watch_timing(),
        vec!["--event-history-events", "2", "--event-history-age", "1ms"],
    ]
    .concat();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let _agent = start_agent(&url, "gpu-1", &dir.path().join("gpu-1"));
    wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;
    let mut client = coordinator.client().await;
    for reason in ["a", "b", "c"] {
        client
            .drain_node(proto::DrainNodeRequest {
                node_id: "gpu-1".to_owned(),
                reason: reason.to_owned(),
            })
            .await
            .unwrap();
    }
    // The agent's heartbeats make the writer flush, and prune, every second.
    let refused = wait_for("revision 1 to be pruned", SETTLE_DEADLINE, || {
        let mut client = client.clone();
        async move {
            let answer = client
                .watch_nodes(proto::WatchNodesRequest { since_revision: 1 })
                .await;
            answer
                .err()
                .filter(|status| status.code() == Code::OutOfRange)
        }
    })
    .await;
    assert!(
        refused.message().contains("since_revision=0"),
        "{refused:?}"
    );

    let ahead = client
        .watch_nodes(proto::WatchNodesRequest {
            since_revision: 1_000,
        })
        .await
        .err()
        .unwrap();
    assert_eq!(ahead.code(), Code::FailedPrecondition);
    assert!(ahead.message().contains("latest revision"), "{ahead:?}");

    let out = dir.path().join("cli.json");
    let mut cli = start_cli_watch(&url, &out, &["--since", "1"]);
    let events = wait_for("the CLI to list the fleet again", SETTLE_DEADLINE, || {
        let events = cli_events(&out);
        let done = events.iter().any(|e| e["kind"] == "snapshot_end");
        async move { done.then_some(events) }
    })
    .await;
    let _ = cli.kill();
    let _ = cli.wait();
    assert_eq!(events[0]["kind"], "snapshot");
    assert_eq!(events[0]["node"]["node_id"], "gpu-1");
    assert_eq!(events[0]["node"]["drain_reason"], "c");
    let stderr = std::fs::read_to_string(out.with_extension("stderr")).unwrap();
    assert!(
        stderr.contains("listing the fleet again from revision 0"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_needs_the_admin_token_and_sends_bookmarks() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let token_file = token_file.display().to_string();
    let extra = [watch_timing(), vec!["--admin-token-file", &token_file]].concat();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let mut client = coordinator.client().await;

    let refused = client
        .watch_nodes(proto::WatchNodesRequest { since_revision: 0 })
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let mut request = tonic::Request::new(proto::WatchNodesRequest { since_revision: 0 });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    let mut stream = client.watch_nodes(request).await.unwrap().into_inner();
    let end = stream.message().await.unwrap().unwrap();
    assert_eq!(end.kind(), NodeEventKind::SnapshotEnd);
    assert_eq!(end.revision, 0);
    assert!(!end.database_id.is_empty());
    let bookmark = tokio::time::timeout(START_DEADLINE, stream.message())
        .await
        .expect("a bookmark within the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(bookmark.kind(), NodeEventKind::Bookmark);
    assert_eq!(bookmark.revision, 0);
    assert_eq!(bookmark.database_id, end.database_id);

    let out = dir.path().join("cli.json");
    let mut cli = start_cli_watch(&coordinator.url(), &out, &[]);
    let status = wait_for(
        "the CLI to give up on a missing token",
        START_DEADLINE,
        || {
            let status = cli.try_wait().unwrap();
            async move { status }
        },
    )
    .await;
    assert!(!status.success());
    let stderr = std::fs::read_to_string(out.with_extension("stderr")).unwrap();
    assert!(stderr.contains("--admin-token-file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_that_stops_reading_slows_nobody_and_is_told_where_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let extra = [watch_timing(), vec!["--watch-buffer", "16"]].concat();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let _agent = start_agent(&url, "gpu-1", &dir.path().join("gpu-1"));
    wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;
    let mut client = coordinator.client().await;
    // Its own connection, with a small window, so that a watcher that stops
    // reading fills it soon.
    let small_window = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .connect()
        .await
        .unwrap();
    let mut watcher = proto::coordinator_client::CoordinatorClient::new(small_window);
    let mut stalled = watcher
        .watch_nodes(proto::WatchNodesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    while stalled.message().await.unwrap().unwrap().kind() != NodeEventKind::SnapshotEnd {}

    // Enough events to fill the stream's flow-control window, its queue
    // and the watcher's buffer, while the watcher reads nothing.
    let started = std::time::Instant::now();
    for i in 0..600 {
        client
            .drain_node(proto::DrainNodeRequest {
                node_id: "gpu-1".to_owned(),
                reason: format!("reason {i} {}", "x".repeat(200)),
            })
            .await
            .unwrap();
    }
    say(&format!(
        "600 drains took {:?} with a stalled watcher",
        started.elapsed()
    ));
    assert!(
        list_nodes(&url).await.is_some(),
        "the coordinator still answers"
    );

    let mut latest = client
        .watch_nodes(proto::WatchNodesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let latest = loop {
        let event = latest.message().await.unwrap().unwrap();
        if event.kind() == NodeEventKind::SnapshotEnd {
            break event.revision;
        }
    };

    let mut last = 0;
    let mut ended = None;
    for _ in 0..1_000 {
        let message = tokio::time::timeout(START_DEADLINE, stalled.message())
            .await
            .expect("the stalled watch answers");
        match message {
            Ok(Some(event))
                if event.kind() == NodeEventKind::Bookmark && event.revision >= latest =>
            {
                panic!("the stalled watcher caught up at {latest} instead of being ended")
            }
            Ok(Some(event)) => last = event.revision,
            Ok(None) => panic!("the watch ended without a status after {last}"),
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    let ended = ended.expect("the stalled watch ended within 1,000 messages");
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    let resume_from: u64 = ended
        .message()
        .rsplit("since_revision=")
        .next()
        .and_then(|tail| tail.parse().ok())
        .unwrap_or_else(|| panic!("no revision to resume from in {ended:?}"));
    assert_eq!(resume_from, last, "the last revision the watcher received");

    let mut resumed = client
        .watch_nodes(proto::WatchNodesRequest {
            since_revision: resume_from,
        })
        .await
        .unwrap()
        .into_inner();
    let next = resumed.message().await.unwrap().unwrap();
    assert_eq!(next.revision, resume_from + 1, "resumed without a gap");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_watch_ends_with_unavailable_when_the_coordinator_shuts_down_and_does_not_delay_it()
{
    let dir = tempfile::tempdir().unwrap();
    let coordinator = InProcessCoordinator::start(&dir.path().join("muster.db"), &[]).await;
    let mut stream = coordinator
        .client()
        .await
        .watch_nodes(proto::WatchNodesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let end = stream.message().await.unwrap().unwrap();
    assert_eq!(end.kind(), NodeEventKind::SnapshotEnd);

    let started = std::time::Instant::now();
    coordinator.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited {:?} for the watch",
        started.elapsed()
    );
    let ended = tokio::time::timeout(START_DEADLINE, stream.message())
        .await
        .expect("the watch ends")
        .expect_err("with a status");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
}

// The scenario across a restart, on SQLite and on PostgreSQL.
on_every_backend!(a_watch_across_churn_and_a_coordinator_restart_reproduces_list_nodes);
