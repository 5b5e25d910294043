//! Operator commands: `muster nodes list`, `get`, `remove`, `drain` and
//! `undrain`, and
//! `muster health`.

mod health;
mod output;

use std::io::Write;

use tonic::{Request, transport::Channel};

pub use health::run_health;

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

use crate::{
    auth::Token,
    config::{NodesClientConfig, NodesCommand},
    error::RunError,
    grpc,
    node::validate_url,
    proto::{self, coordinator_client::CoordinatorClient},
    tls::Tls,
};

pub async fn run_nodes(command: NodesCommand, out: &mut impl Write) -> Result<(), RunError> {
    match command {
        NodesCommand::List(client) => {
            let operator = Operator::connect(&client).await?;
            let request = operator.request(proto::ListNodesRequest {});
            let nodes = operator
                .coordinator()
                .list_nodes(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner()
                .nodes;
            output::write_nodes(out, client.output, &nodes)?;
        }
        NodesCommand::Get { node_id, client } => {
            let operator = Operator::connect(&client).await?;
            let request = operator.request(proto::GetNodeRequest { node_id });
            let node = operator
                .coordinator()
                .get_node(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner();
            output::write_node(out, client.output, &node)?;
        }
        NodesCommand::Remove { node_id, client } => {
            let operator = Operator::connect(&client).await?;
            let request = operator.request(proto::RemoveNodeRequest { node_id });
            let removed = operator
                .coordinator()
                .remove_node(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner();
            if let Some(node) = removed.node {
                output::write_node(out, client.output, &node)?;
            }
        }
        NodesCommand::Drain {
            node_id,
            reason,
            client,
        } => {
            let operator = Operator::connect(&client).await?;
            let request = operator.request(proto::DrainNodeRequest { node_id, reason });
            let node = operator
                .coordinator()
                .drain_node(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner();
            output::write_node(out, client.output, &node)?;
        }
        NodesCommand::Undrain { node_id, client } => {
            let operator = Operator::connect(&client).await?;
            let request = operator.request(proto::UndrainNodeRequest { node_id });
            let node = operator
                .coordinator()
                .undrain_node(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner();
            output::write_node(out, client.output, &node)?;
        }
    }
    Ok(())
}

/// A connection to the coordinator, with the credentials to present.
struct Operator {
    url: String,
    channel: Channel,
    admin_token: Option<Token>,
}

impl Operator {
    async fn connect(client: &NodesClientConfig) -> Result<Self, RunError> {
        validate_url("--coordinator", &client.coordinator)?;
        let admin_token = match &client.admin_token {
            Some(token) => Some(token.clone()),
            None => {
                Token::from_optional_file("--admin-token-file", client.admin_token_file.as_deref())?
            }
        };
        let tls = Tls::load(&client.tls)?;
        let endpoint = grpc::endpoint(&client.coordinator, tls.as_ref())?;
        let channel = grpc::connect(endpoint, &client.coordinator, CONNECT_TIMEOUT).await?;
        Ok(Self {
            url: client.coordinator.clone(),
            channel,
            admin_token,
        })
    }

    fn coordinator(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel.clone())
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.admin_token {
            token.attach_as_bearer(request.metadata_mut());
        }
        request
    }

    fn rpc_error(&self, status: tonic::Status) -> RunError {
        let hint = match status.code() {
            tonic::Code::Unimplemented => Some(
                "it does not serve muster.v1.Coordinator; is this the coordinator's address?"
                    .to_owned(),
            ),
            tonic::Code::Unauthenticated if self.admin_token.is_none() => Some(format!(
                "{}; give the admin token with --admin-token-file, or MUSTER_ADMIN_TOKEN in the environment",
                status.message()
            )),
            _ => None,
        };
        rpc_failure(&self.url, &status, hint)
    }
}

/// A failed call to `url`, worded for the operator: `hint` where the caller
/// knows better than the server's message what went wrong.
fn rpc_failure(url: &str, status: &tonic::Status, hint: Option<String>) -> RunError {
    let message = hint.unwrap_or_else(|| match status.message() {
        "" => "no details given".to_owned(),
        message => message.to_owned(),
    });
    RunError::Rpc {
        url: url.to_owned(),
        code: status.code(),
        message,
    }
}
