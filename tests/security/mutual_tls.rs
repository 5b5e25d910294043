//! Mutual TLS: only agents, operators and probes with a certificate from the
//! cluster's CA get through, and TLS coordinators refuse plaintext agents.

use std::path::Path;

use tonic::Code;

use crate::{
    JOIN_TOKEN, REFUSAL_WINDOW,
    caller::Caller,
    common::*,
    pki::{CertAndKey, Pki},
    steps::*,
};

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_agents_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let pki = Pki::new(dir.path(), "muster");
    let files = Files::issue(&pki, dir.path());
    let coordinator_flags = files.coordinator_flags();
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", &as_strs(&coordinator_flags));
    let listen = coordinator.process.address.to_string();
    let url = format!("https://{listen}");

    let agent_flags = files.agent_flags(&files.agent);
    let agent = start_agent_with(
        &url,
        "gpu-1",
        &dir.path().join("a1"),
        &as_strs(&agent_flags),
    );
    let operator = Caller::default().with_tls(pki.client(Some(&files.operator)));
    let online = operator.wait_online(&url, "gpu-1").await;
    assert!(online.agent_url.starts_with("https://"), "{online:?}");

    agents_without_a_certificate_from_the_ca_never_get_in(
        &url,
        dir.path(),
        &pki,
        &files,
        &operator,
    )
    .await;
    operators_need_a_client_certificate_and_tls(&url, &pki).await;
    let tls_agent = Caller::member().with_tls(pki.client(Some(&files.operator)));
    agents_advertising_plaintext_are_refused(&url, &tls_agent).await;
    the_cli_speaks_mutual_tls(&url, &files);
    let agent_url = format!("https://{}", agent.address);
    the_agent_status_needs_a_certificate_and_the_join_token(&agent_url, &pki, &files, &tls_agent)
        .await;

    // After a restart, probes reach the agent over mutual TLS.
    coordinator.process.kill();
    restart_and_probe(&db, &as_strs(&coordinator_flags), "gpu-1").await;
    drop(agent);
}

/// The files of the cluster's PKI, and of an agent certified by another CA.
struct Files {
    ca: String,
    coordinator: CertAndKey,
    agent: CertAndKey,
    operator: CertAndKey,
    rogue: CertAndKey,
    join_token: String,
}

impl Files {
    fn issue(pki: &Pki, dir: &Path) -> Self {
        Self {
            ca: pki.ca_file("ca"),
            coordinator: pki.issue("coordinator"),
            agent: pki.issue("agent"),
            operator: pki.issue("operator"),
            rogue: Pki::new(dir, "rogue").issue("rogue-agent"),
            join_token: write_file(dir, "join-token", JOIN_TOKEN),
        }
    }

    fn coordinator_flags(&self) -> Vec<String> {
        let (cert, key) = &self.coordinator;
        let tls = [
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            &self.ca,
            "--join-token-file",
            &self.join_token,
        ];
        fast_timing_and(&tls)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    fn agent_flags(&self, (cert, key): &CertAndKey) -> Vec<String> {
        [
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            &self.ca,
            "--join-token-file",
            &self.join_token,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// An agent whose certificate another CA signed, and one with no client
/// certificate at all, never get in.
async fn agents_without_a_certificate_from_the_ca_never_get_in(
    url: &str,
    dir: &Path,
    pki: &Pki<'_>,
    files: &Files,
    operator: &Caller,
) {
    let rogue_flags = files.agent_flags(&files.rogue);
    let rogue_agent = start_agent_with(url, "gpu-2", &dir.join("a2"), &as_strs(&rogue_flags));
    let certless_agent = Caller::member().with_tls(pki.client(None));
    let refused = certless_agent
        .register(url, register_message("gpu-3", "https://127.0.0.1:9", "b"))
        .await;
    assert!(
        refused.is_err(),
        "a stream without a client certificate got in"
    );
    wait_for_line(&rogue_agent, &["coordinator link down"]).await;
    hold_for("only the certified agent is in", REFUSAL_WINDOW, || async {
        let nodes = operator.list_nodes(url).await.map_err(|e| e.to_string())?;
        let ids: Vec<_> = nodes.iter().map(|n| n.node_id.clone()).collect();
        if ids == ["gpu-1"] {
            Ok(())
        } else {
            Err(format!("listed {ids:?}"))
        }
    })
    .await;
}

/// Operators need a client certificate too, and plaintext gets nowhere.
async fn operators_need_a_client_certificate_and_tls(url: &str, pki: &Pki<'_>) {
    let certless = Caller::default().with_tls(pki.client(None));
    assert!(certless.list_nodes(url).await.is_err());
    let plaintext_url = url.replacen("https://", "http://", 1);
    assert!(Caller::default().list_nodes(&plaintext_url).await.is_err());
}

/// A coordinator on TLS refuses agents that advertise a plaintext URL: its
/// probes would carry the join token in the clear.
async fn agents_advertising_plaintext_are_refused(url: &str, tls_agent: &Caller) {
    let refused = tls_agent
        .refused(url, register_message("gpu-4", "http://127.0.0.1:9", "b"))
        .await;
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("must be https"), "{refused:?}");
}

/// The CLI speaks mutual TLS with the same flags.
fn the_cli_speaks_mutual_tls(url: &str, files: &Files) {
    let (cert, key) = &files.operator;
    let listed = muster(
        &[
            "nodes",
            "list",
            "--coordinator",
            url,
            "--tls-ca",
            &files.ca,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
        &[],
    );
    assert!(stdout_of(&listed).contains("gpu-1"), "{listed:?}");
}

/// The agent's Status service requires a client certificate from the CA,
/// and the join token.
async fn the_agent_status_needs_a_certificate_and_the_join_token(
    agent_url: &str,
    pki: &Pki<'_>,
    files: &Files,
    tls_agent: &Caller,
) {
    let certless = Caller::member().with_tls(pki.client(None));
    let rogue = Caller::member().with_tls(pki.client(Some(&files.rogue)));
    for caller in [certless, rogue] {
        assert!(caller.status(agent_url).await.is_err());
    }
    assert_eq!(tls_agent.status(agent_url).await.unwrap().node_id, "gpu-1");
}
