//! Hostile first messages on a Heartbeat stream get a status that names the
//! field and the limit, and change nothing.

use muster::proto::{self, NodeState};
use tonic::Code;

use crate::{caller::Caller, common::*};

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_a_clear_status_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let url = coordinator.url();
    let before = node(&url, "gpu-1").await.unwrap();

    for (first, code, expected) in hostile_first_messages() {
        let refused = Caller::default().refused(&url, first).await;
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(
            refused.message().contains(expected),
            "{expected:?} in {refused:?}"
        );
    }

    let after = node(&url, "gpu-1").await.unwrap();
    assert_eq!(state_of(&after), NodeState::Online);
    assert_eq!(after.session_generation, before.session_generation);
    assert_eq!(stored_node_ids(&db).await, ["gpu-1"]);
}

/// A valid registration of gpu-9, changed by `edit`.
fn edit_register(edit: impl FnOnce(&mut proto::Register)) -> proto::AgentMessage {
    let mut message = register_message("gpu-9", "http://127.0.0.1:9", "boot");
    if let Some(proto::agent_message::Kind::Register(register)) = &mut message.kind {
        edit(register);
    }
    message
}

/// Each first message, with the code and a part of the message it must get.
fn hostile_first_messages() -> Vec<(proto::AgentMessage, Code, &'static str)> {
    vec![
        (
            edit_register(|r| r.node_id = "a".repeat(64)),
            Code::InvalidArgument,
            "register.node_id must be 1 to 63",
        ),
        (
            edit_register(|r| r.node_id = "-gpu".into()),
            Code::InvalidArgument,
            "register.node_id must start",
        ),
        (
            edit_register(|r| r.node_id = "GPU".into()),
            Code::InvalidArgument,
            "register.node_id may contain only",
        ),
        (
            edit_register(|r| r.agent_url = "ftp://h:1".into()),
            Code::InvalidArgument,
            "register.agent_url must be an http or https URL",
        ),
        (
            edit_register(|r| r.agent_url = "http://h".into()),
            Code::InvalidArgument,
            "register.agent_url must name a port",
        ),
        (
            edit_register(|r| r.agent_url = format!("http://h:1/{}", "x".repeat(2048))),
            Code::InvalidArgument,
            "register.agent_url must be at most 2048 bytes",
        ),
        (
            edit_register(|r| {
                r.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect()
            }),
            Code::InvalidArgument,
            "at most 64 labels",
        ),
        (
            edit_register(|r| {
                r.labels.insert("k".repeat(64), String::new());
            }),
            Code::InvalidArgument,
            "must be 1 to 63 bytes",
        ),
        (
            edit_register(|r| {
                r.labels.insert("gpu".into(), "v".repeat(257));
            }),
            Code::InvalidArgument,
            "must be at most 256 bytes",
        ),
        (
            edit_register(|r| r.node_secret.clear()),
            Code::InvalidArgument,
            "register.node_secret must be 16 to 256",
        ),
        (
            edit_register(|r| {
                r.labels.insert("big".into(), "x".repeat(70 * 1024));
            }),
            Code::ResourceExhausted,
            "65536",
        ),
        (
            heartbeat_message(1),
            Code::FailedPrecondition,
            "must be register",
        ),
    ]
}
