//! The coordinator's HTTP listener without a browser: the login and its
//! cookie, `/api/nodes`, `/events` and its resume from `Last-Event-ID`,
//! `/metrics`, and the flags that place or disable the listener.

mod common;

use std::time::Duration;

use common::*;
use muster::proto::{self, NodeState};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
/// Events arrive within this once they happened.
const EVENT_DEADLINE: Duration = Duration::from_secs(10);

fn with_admin_token(dir: &std::path::Path) -> Vec<String> {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    [
        FAST_TIMING,
        &["--admin-token-file", token_file.to_str().unwrap()],
    ]
    .concat()
    .into_iter()
    .map(str::to_owned)
    .collect()
}

async fn drain(url: &str, node_id: &str, reason: &str, token: Option<&str>) {
    let mut request = tonic::Request::new(proto::DrainNodeRequest {
        node_id: node_id.to_owned(),
        reason: reason.to_owned(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    connect(url)
        .await
        .unwrap()
        .drain_node(request)
        .await
        .expect("drained");
}

/// The `name=value` part of a `Set-Cookie` header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_about_the_fleet_is_served_without_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let extra = with_admin_token(dir.path());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let http_address = coordinator.http_address();
    let _agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("gpu-1"));

    let page = http(http_address, "GET", "/", &[], "").await;
    assert_eq!(page.status, 303, "{page:?}");
    assert_eq!(page.header("location"), Some("/login"));
    assert!(!page.body.contains("gpu-1"));
    for path in ["/api/nodes", "/events"] {
        let refused = http(http_address, "GET", path, &[], "").await;
        assert_eq!(refused.status, 401, "{path}: {refused:?}");
        assert!(refused.body.contains("/login"), "{refused:?}");
    }
    let forged = format!("muster_session={ADMIN_TOKEN}");
    let refused = http(
        http_address,
        "GET",
        "/api/nodes",
        &[("Cookie", &forged)],
        "",
    )
    .await;
    assert_eq!(refused.status, 401, "the token itself is not a session");

    let login = http(http_address, "GET", "/login", &[], "").await;
    assert_eq!(login.status, 200);
    assert!(login.body.contains(r#"name="token""#), "{login:?}");
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let wrong = http(
        http_address,
        "POST",
        "/login",
        &[form],
        "token=admin-token-0123456789abcdeX",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    assert!(wrong.body.contains("not this coordinator"), "{wrong:?}");

    let logged_in = http(
        http_address,
        "POST",
        "/login",
        &[form],
        &format!("token={ADMIN_TOKEN}"),
    )
    .await;
    assert_eq!(logged_in.status, 303, "{logged_in:?}");
    let set_cookie = logged_in.header("set-cookie").expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains(ADMIN_TOKEN), "{set_cookie}");
    let cookie = cookie_pair(set_cookie);

    let page = http(http_address, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/dashboard.js"), "{page:?}");
    assert!(
        page.header("content-security-policy")
            .is_some_and(|csp| csp.contains("default-src 'self'")),
        "{page:?}"
    );
    let nodes = wait_for("gpu-1 ONLINE in /api/nodes", START_DEADLINE, || {
        let cookie = cookie.clone();
        async move {
            let listed = http(
                http_address,
                "GET",
                "/api/nodes",
                &[("Cookie", &cookie)],
                "",
            )
            .await;
            assert_eq!(listed.status, 200, "{listed:?}");
            let nodes: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
            (nodes["nodes"][0]["state"] == "ONLINE").then_some(nodes)
        }
    })
    .await;
    assert_eq!(nodes["nodes"][0]["node_id"], "gpu-1");
    assert_eq!(nodes["nodes"][0]["labels"]["gpu"], "test");

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let listed = http(
        http_address,
        "GET",
        "/api/nodes",
        &[("Authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(listed.status, 200, "API clients may send the token itself");

    let mut events = SseStream::open(http_address, "/events", &[("Cookie", &cookie)]).await;
    assert_eq!(events.status, 200);
    let snapshot = events
        .next_matching("the snapshot", EVENT_DEADLINE, |e| e.event == "node")
        .await;
    assert_eq!(snapshot.json()["node"]["node_id"], "gpu-1");

    let metrics = http(http_address, "GET", "/metrics", &[], "").await;
    assert_eq!(metrics.status, 200, "metrics stay open to scrapers");
    assert!(
        metrics.body.contains("muster_admin_requests_refused_total"),
        "{}",
        metrics.body
    );

    let logged_out = http(http_address, "POST", "/logout", &[("Cookie", &cookie)], "").await;
    assert_eq!(logged_out.status, 303);
    assert!(
        logged_out
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "{logged_out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_nodes_shows_what_list_nodes_shows_drain_included() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    drain(&coordinator.url(), "gpu-1", "fan replacement", None).await;
    let listed = list_nodes(&coordinator.url()).await.unwrap();
    let api = http(coordinator.http_address(), "GET", "/api/nodes", &[], "").await;
    assert_eq!(api.status, 200);
    assert_eq!(api.header("content-type"), Some("application/json"));
    let api: serde_json::Value = serde_json::from_str(&api.body).unwrap();
    let shown = &api["nodes"][0];
    assert_eq!(shown["node_id"], listed[0].node_id.as_str());
    assert_eq!(shown["drained"], true);
    assert_eq!(shown["drain_reason"], "fan replacement");
    assert!(shown["drained_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(shown["state"], "ONLINE");
    assert_eq!(
        shown["session_generation"].as_u64(),
        Some(listed[0].session_generation)
    );
    assert!(shown["last_seen"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_resume_after_the_last_event_id_and_start_over_when_it_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, mut agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let http_address = coordinator.http_address();

    let mut events = SseStream::open(http_address, "/events", &[]).await;
    assert_eq!(events.status, 200);
    assert_eq!(
        events
            .headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str()),
        Some("text/event-stream")
    );
    let snapshot = events
        .next_matching("a snapshot node", EVENT_DEADLINE, |e| e.event == "node")
        .await;
    assert_eq!(snapshot.json()["kind"], "snapshot");
    assert_eq!(snapshot.id, None, "a snapshot's nodes carry no id");
    let end = events
        .next_matching("snapshot_end", EVENT_DEADLINE, |e| {
            e.json()["kind"] == "snapshot_end"
        })
        .await;
    let snapshot_revision: u64 = end.id.clone().unwrap().parse().unwrap();
    assert_eq!(end.json()["revision"].as_u64(), Some(snapshot_revision));
    let database_id = end.json()["database_id"].as_str().unwrap().to_owned();
    assert!(!database_id.is_empty());

    drain(&coordinator.url(), "gpu-1", "reseating GPUs", None).await;
    let drained = events
        .next_matching("the drain", EVENT_DEADLINE, |e| {
            e.json()["kind"] == "changed"
        })
        .await;
    let drained_revision: u64 = drained.id.clone().unwrap().parse().unwrap();
    assert!(drained_revision > snapshot_revision);
    assert_eq!(drained.json()["reason"], "drained");
    assert_eq!(drained.json()["node"]["drain_reason"], "reseating GPUs");
    drop(events);

    // While no page watches, the node goes OFFLINE.
    agent.kill();
    wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        NodeState::Offline,
        START_DEADLINE,
    )
    .await;

    let last = snapshot_revision.to_string();
    let mut resumed = SseStream::open(http_address, "/events", &[("Last-Event-ID", &last)]).await;
    let first = resumed
        .next_matching("the first event after the resume", EVENT_DEADLINE, |e| {
            e.event == "node"
        })
        .await;
    assert_eq!(first.id.as_deref(), Some(drained.id.as_deref().unwrap()));
    assert_eq!(first.json()["kind"], "changed", "no snapshot on a resume");
    let offline = resumed
        .next_matching("the missed OFFLINE", EVENT_DEADLINE, |e| {
            e.json()["node"]["state"] == "OFFLINE"
        })
        .await;
    assert!(offline.id.unwrap().parse::<u64>().unwrap() > drained_revision);

    // A revision this database never issued (it was replaced): start over.
    let mut reset = SseStream::open(
        http_address,
        "/events?since=1",
        &[("Last-Event-ID", "999999")],
    )
    .await;
    assert_eq!(reset.status, 200);
    let first = reset.next(EVENT_DEADLINE).await.unwrap();
    assert_eq!(first.event, "reset", "{first:?}");
    let snapshot = reset
        .next_matching("a fresh snapshot", EVENT_DEADLINE, |e| e.event == "node")
        .await;
    assert_eq!(snapshot.json()["kind"], "snapshot");
    assert_eq!(snapshot.json()["node"]["state"], "OFFLINE");
    assert_eq!(snapshot.json()["database_id"], database_id.as_str());

    let malformed = http(
        http_address,
        "GET",
        "/events",
        &[("Last-Event-ID", "latest")],
        "",
    )
    .await;
    assert_eq!(malformed.status, 400);
    assert!(malformed.body.contains("Last-Event-ID"), "{malformed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_can_be_turned_off_and_metrics_listen_says_it_is_deprecated() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(
        &dir.path().join("muster.db"),
        "127.0.0.1:0",
        &["--http-listen", "off", "--metrics-listen", "127.0.0.1:0"],
    );
    assert!(coordinator.process.log_contains("http_address=off"));
    assert!(!coordinator.process.log_contains("serving the dashboard"));
    assert!(
        coordinator
            .process
            .log_contains("--metrics-listen is deprecated"),
        "{:?}",
        coordinator.process.log_lines()
    );
    let metrics_address = coordinator
        .process
        .wait_for_log(0, START_DEADLINE, |line| field(line, "metrics_address="))
        .await;
    assert!(scrape(&metrics_address).contains("200 OK"));

    let refused = muster_output(&["coordinator", "--http-listen", "localhost"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("error: invalid value 'localhost' for '--http-listen")
            && stderr.contains("or off"),
        "{stderr}"
    );
}

fn muster_output(args: &[&str]) -> std::process::Output {
    output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(args)
            .env("MUSTER_LOG", "off"),
        START_DEADLINE,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revision_the_history_no_longer_holds_gets_a_reset_and_a_fresh_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        FAST_TIMING,
        &["--event-history-events", "2", "--event-history-age", "1ms"],
    ]
    .concat();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let _agent = start_agent(&url, "gpu-1", &dir.path().join("gpu-1"));
    wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;
    for reason in ["a", "b", "c"] {
        drain(&url, "gpu-1", reason, None).await;
    }
    // The agent's heartbeats make the writer flush, and prune, every second.
    let client = coordinator.client().await;
    wait_for("revision 1 to be pruned", START_DEADLINE, || {
        let mut client = client.clone();
        async move {
            let answer = client
                .watch_nodes(proto::WatchNodesRequest { since_revision: 1 })
                .await;
            answer
                .err()
                .filter(|status| status.code() == tonic::Code::OutOfRange)
        }
    })
    .await;

    let mut events = SseStream::open(
        coordinator.http_address(),
        "/events",
        &[("Last-Event-ID", "1")],
    )
    .await;
    assert_eq!(events.status, 200);
    let reset = events.next(EVENT_DEADLINE).await.unwrap();
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert!(reset.data.contains("since_revision=0"), "{reset:?}");
    let snapshot = events.next(EVENT_DEADLINE).await.unwrap();
    assert_eq!(snapshot.json()["kind"], "snapshot");
    assert_eq!(snapshot.json()["node"]["drain_reason"], "c");
    let end = events.next(EVENT_DEADLINE).await.unwrap();
    assert_eq!(end.json()["kind"], "snapshot_end");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_event_stream_never_holds_up_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let mut events = SseStream::open(coordinator.http_address(), "/events", &[]).await;
    events
        .next_matching("snapshot_end", EVENT_DEADLINE, |e| {
            e.event == "node" && e.json()["kind"] == "snapshot_end"
        })
        .await;
    let status = coordinator
        .process
        .stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let ended = loop {
        match events.next(EVENT_DEADLINE).await {
            Some(event) if event.event == "node" => continue,
            other => break other,
        }
    };
    assert!(
        ended.is_none() || ended.as_ref().is_some_and(|e| e.event == "end"),
        "{ended:?}"
    );
}
