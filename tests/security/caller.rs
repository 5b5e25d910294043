//! How a test reaches a server: the TLS material and credentials it presents.

use std::time::Duration;

use muster::proto::{
    self, NodeState, agent_client::AgentClient, coordinator_client::CoordinatorClient,
};
use tonic::{
    Request, Status,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{ADMIN_TOKEN, JOIN_TOKEN, common::*};

#[derive(Clone, Default)]
pub struct Caller {
    pub tls: Option<ClientTlsConfig>,
    pub join_token: Option<&'static str>,
    pub admin_token: Option<&'static str>,
}

impl Caller {
    pub fn admin() -> Self {
        Self {
            admin_token: Some(ADMIN_TOKEN),
            ..Self::default()
        }
    }

    /// A caller presenting the cluster's join token, as agents do.
    pub fn member() -> Self {
        Self::with_join_token(JOIN_TOKEN)
    }

    pub fn with_join_token(token: &'static str) -> Self {
        Self {
            join_token: Some(token),
            ..Self::default()
        }
    }

    pub fn with_tls(self, tls: ClientTlsConfig) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }

    pub async fn channel(&self, url: &str) -> Result<Channel, Status> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).unwrap();
        }
        endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("{e:?}")))
    }

    fn metadata(&self) -> Vec<(&'static str, String)> {
        let mut metadata = Vec::new();
        if let Some(token) = self.join_token {
            metadata.push(("x-muster-join-token", token.to_owned()));
        }
        if let Some(token) = self.admin_token {
            metadata.push(("authorization", format!("Bearer {token}")));
        }
        metadata
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        for (key, value) in self.metadata() {
            request.metadata_mut().insert(key, value.parse().unwrap());
        }
        request
    }

    pub async fn list_nodes(&self, url: &str) -> Result<Vec<proto::Node>, Status> {
        let channel = self.channel(url).await?;
        let request = self.request(proto::ListNodesRequest {});
        Ok(CoordinatorClient::new(channel)
            .list_nodes(request)
            .await?
            .into_inner()
            .nodes)
    }

    pub async fn wait_online(&self, url: &str, node_id: &str) -> proto::Node {
        wait_for(&format!("{node_id} ONLINE"), START_DEADLINE, || async {
            self.list_nodes(url)
                .await
                .ok()?
                .into_iter()
                .find(|n| n.node_id == node_id && state_of(n) == NodeState::Online)
        })
        .await
    }

    /// Opens a Heartbeat stream with `first` and waits for `registered`.
    pub async fn register(
        &self,
        url: &str,
        first: proto::AgentMessage,
    ) -> Result<(RawStream, u64), Status> {
        let channel = self.channel(url).await?;
        RawStream::open_on(channel, first, &self.metadata())
            .await?
            .registered()
            .await
    }

    /// Like [`Caller::register`], for a stream that must be refused.
    pub async fn refused(&self, url: &str, first: proto::AgentMessage) -> Status {
        self.register(url, first).await.err().expect("refused")
    }

    pub async fn status(&self, url: &str) -> Result<proto::StatusResponse, Status> {
        let channel = self.channel(url).await?;
        let request = self.request(proto::StatusRequest {});
        Ok(AgentClient::new(channel)
            .status(request)
            .await?
            .into_inner())
    }
}
