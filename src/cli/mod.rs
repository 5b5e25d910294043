//! Operator commands: `muster nodes list` and `muster nodes get`.

mod output;

use std::io::Write;

use tonic::transport::Endpoint;

use crate::{
    config::{NodesClientConfig, NodesCommand},
    error::RunError,
    node::validate_url,
    proto::{self, coordinator_client::CoordinatorClient},
};

pub async fn run_nodes(command: NodesCommand, out: &mut impl Write) -> Result<(), RunError> {
    match command {
        NodesCommand::List(client) => {
            let mut coordinator = connect(&client).await?;
            let nodes = coordinator
                .list_nodes(proto::ListNodesRequest {})
                .await
                .map_err(|status| rpc_error(&client, status))?
                .into_inner()
                .nodes;
            output::write_nodes(out, client.output, &nodes)?;
        }
        NodesCommand::Get { node_id, client } => {
            let mut coordinator = connect(&client).await?;
            let node = coordinator
                .get_node(proto::GetNodeRequest { node_id })
                .await
                .map_err(|status| rpc_error(&client, status))?
                .into_inner();
            output::write_node(out, client.output, &node)?;
        }
    }
    Ok(())
}

async fn connect(
    client: &NodesClientConfig,
) -> Result<CoordinatorClient<tonic::transport::Channel>, RunError> {
    validate_url("--coordinator", &client.coordinator)?;
    let connect_error = |source| RunError::Connect {
        url: client.coordinator.clone(),
        source,
    };
    let channel = Endpoint::from_shared(client.coordinator.clone())
        .map_err(connect_error)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(connect_error)?;
    Ok(CoordinatorClient::new(channel))
}

fn rpc_error(client: &NodesClientConfig, status: tonic::Status) -> RunError {
    let message = match status.code() {
        tonic::Code::Unimplemented => {
            "it does not serve muster.v1.Coordinator; is this the coordinator's address?".to_owned()
        }
        _ if status.message().is_empty() => "no details given".to_owned(),
        _ => status.message().to_owned(),
    };
    RunError::Rpc {
        url: client.coordinator.clone(),
        code: status.code(),
        message,
    }
}
