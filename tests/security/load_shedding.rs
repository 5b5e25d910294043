//! Streams and registrations past the configured limits are shed with
//! RESOURCE_EXHAUSTED naming the flag; operator calls are never shed.

use tonic::Code;

use crate::{JOIN_TOKEN, caller::Caller, common::*, steps::*};

const AGENT_URL: &str = "http://127.0.0.1:9";

#[tokio::test(flavor = "multi_thread")]
async fn streams_past_max_streams_are_shed_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let flags = fast_timing_and(&["--max-streams", "2"]);
    let coordinator = Coordinator::start(&dir.path().join("limited.db"), "127.0.0.1:0", &flags);
    let url = coordinator.url();
    let (first, _) = RawStream::register(&url, "gpu-1", AGENT_URL, "b").await;
    let (_second, _) = RawStream::register(&url, "gpu-2", AGENT_URL, "b").await;
    let shed = Caller::default()
        .register(&url, register_message("gpu-3", AGENT_URL, "b"))
        .await
        .err()
        .expect("shed");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("--max-streams"), "{shed:?}");
    assert_eq!(
        list_nodes(&url).await.unwrap().len(),
        2,
        "operators are never shed"
    );
    drop(first);
    wait_for("a freed stream slot", START_DEADLINE, || async {
        Caller::default()
            .register(&url, register_message("gpu-3", AGENT_URL, "b"))
            .await
            .ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_past_the_rate_are_shed_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let join_file = write_file(dir.path(), "join-token", JOIN_TOKEN);
    let flags = fast_timing_and(&[
        "--max-registrations-per-second",
        "1",
        "--join-token-file",
        &join_file,
    ]);
    let coordinator = Coordinator::start(&dir.path().join("rated.db"), "127.0.0.1:0", &flags);
    let url = coordinator.url();

    callers_without_the_join_token_use_up_none_of_the_rate(&url).await;
    a_burst_of_members_is_shed(&url).await;
    assert!(list_nodes(&url).await.is_some(), "operators are never shed");
}

/// A member still gets in right after a flood of callers without the token.
async fn callers_without_the_join_token_use_up_none_of_the_rate(url: &str) {
    for i in 0..20 {
        let first = register_message(&format!("intruder-{i}"), AGENT_URL, "b");
        let refused = Caller::default().register(url, first).await.err();
        assert_eq!(refused.map(|s| s.code()), Some(Code::Unauthenticated));
    }
    Caller::member()
        .register(url, register_message("gpu-member", AGENT_URL, "b"))
        .await
        .expect("a member is admitted after a flood without the token");
}

async fn a_burst_of_members_is_shed(url: &str) {
    let attempts = (0..6).map(|i| async move {
        Caller::member()
            .register(url, register_message(&format!("gpu-{i}"), AGENT_URL, "b"))
            .await
    });
    let outcomes = futures::future::join_all(attempts).await;
    let shed: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        !shed.is_empty(),
        "six registrations at once passed a limit of one per second"
    );
    for status in shed {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("--max-registrations-per-second"),
            "{status:?}"
        );
    }
}
