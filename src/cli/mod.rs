//! Operator commands: `muster nodes list` and `muster nodes get`.

mod output;

use std::io::Write;

use tonic::transport::Endpoint;

use crate::{
    config::{NodesClientConfig, NodesCommand},
    error::RunError,
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
    RunError::Rpc {
        url: client.coordinator.clone(),
        code: status.code(),
        message: status.message().to_owned(),
    }
}
