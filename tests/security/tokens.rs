//! The join token guards Heartbeat streams and the agent's Status service;
//! the admin token guards operator calls. Neither is ever logged.

use std::{path::Path, process::Command};

use muster::proto::{self, coordinator_client::CoordinatorClient};
use tonic::Code;

use crate::{ADMIN_TOKEN, JOIN_TOKEN, caller::Caller, common::*, steps::*};

#[tokio::test(flavor = "multi_thread")]
async fn tokens_guard_streams_probes_and_operator_calls() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let join_file = write_file(dir.path(), "join-token", &format!("{JOIN_TOKEN}\n"));
    let admin_file = write_file(dir.path(), "admin-token", ADMIN_TOKEN);
    let flags = fast_timing_and(&[
        "--join-token-file",
        &join_file,
        "--admin-token-file",
        &admin_file,
    ]);
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", &flags);
    let url = coordinator.url();
    let agent = start_agent_with(
        &url,
        "gpu-1",
        &dir.path().join("a1"),
        &["--join-token-file", &join_file],
    );
    Caller::admin().wait_online(&url, "gpu-1").await;

    streams_need_the_join_token(&url).await;
    let tokenless = an_agent_without_the_token_is_told_to_check_it(&url, dir.path()).await;
    operator_calls_need_the_admin_token(&url).await;
    only_the_agent_with_the_token_got_in(&url).await;
    the_cli_passes_the_admin_token_from_a_file_or_the_environment(&url, &admin_file);
    the_agent_status_service_needs_the_join_token(&agent).await;

    coordinator.process.kill();
    let coordinator = restart_and_probe(&db, &flags, "gpu-1").await;
    grpcurl_lists_nodes_with_the_admin_token(&coordinator);

    for (name, process) in [
        ("coordinator", &coordinator.process),
        ("agent", &agent),
        ("tokenless agent", &tokenless),
    ] {
        for token in [JOIN_TOKEN, ADMIN_TOKEN] {
            assert!(!process.log_contains(token), "the {name} logged a token");
        }
    }
}

async fn streams_need_the_join_token(url: &str) {
    for caller in [
        Caller::default(),
        Caller::with_join_token("join-token-but-not-the-right-one"),
        Caller::admin(),
    ] {
        let refused = caller
            .refused(url, register_message("gpu-2", "http://127.0.0.1:9", "b"))
            .await;
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("x-muster-join-token"),
            "{refused:?}"
        );
    }
}

async fn an_agent_without_the_token_is_told_to_check_it(url: &str, dir: &Path) -> Process {
    let tokenless = start_agent(url, "gpu-2", &dir.join("a2"));
    wait_for_line(&tokenless, &["check --join-token-file"]).await;
    tokenless
}

/// Every operator call needs the admin token, as a bearer token.
async fn operator_calls_need_the_admin_token(url: &str) {
    let wrong_token = Caller {
        admin_token: Some(JOIN_TOKEN),
        ..Caller::default()
    };
    for caller in [Caller::default(), wrong_token] {
        let refused = caller.list_nodes(url).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        let channel = caller.channel(url).await.unwrap();
        let mut client = CoordinatorClient::new(channel);
        let get = client
            .get_node(caller.request(proto::GetNodeRequest {
                node_id: "gpu-1".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(get.code(), Code::Unauthenticated);
        let remove = client
            .remove_node(caller.request(proto::RemoveNodeRequest {
                node_id: "gpu-1".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(remove.code(), Code::Unauthenticated);
    }
}

async fn only_the_agent_with_the_token_got_in(url: &str) {
    let nodes = Caller::admin().list_nodes(url).await.unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["gpu-1"],
        "the agent without the token never got in"
    );
}

fn the_cli_passes_the_admin_token_from_a_file_or_the_environment(url: &str, admin_file: &str) {
    let list = ["nodes", "list", "--coordinator", url];
    one_line_error(&muster(&list, &[]), "MUSTER_ADMIN_TOKEN");
    let by_env = muster(&list, &[("MUSTER_ADMIN_TOKEN", ADMIN_TOKEN)]);
    assert!(stdout_of(&by_env).contains("gpu-1"), "{by_env:?}");
    let by_file = muster(
        &[&list[..], &["--admin-token-file", admin_file]].concat(),
        &[],
    );
    assert!(stdout_of(&by_file).contains("gpu-1"), "{by_file:?}");
}

async fn the_agent_status_service_needs_the_join_token(agent: &Process) {
    let refused = Caller::default().status(&agent.url()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let status = Caller::member().status(&agent.url()).await.unwrap();
    assert_eq!(status.node_id, "gpu-1");
}

/// grpcurl, given the admin token as a header, lists the nodes.
fn grpcurl_lists_nodes_with_the_admin_token(coordinator: &Coordinator) {
    if !tool_available(
        &["grpcurl", "-version"],
        GRPCURL_INSTALL,
        "the grpcurl part of the tokens test",
    ) {
        return;
    }
    let output = Command::new("grpcurl")
        .args(["-plaintext", "-H"])
        .arg(format!("authorization: Bearer {ADMIN_TOKEN}"))
        .arg(coordinator.process.address.to_string())
        .arg("muster.v1.Coordinator/ListNodes")
        .output()
        .expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("gpu-1"), "{output:?}");
}
