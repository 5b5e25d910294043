//! `muster health`: asks a coordinator or an agent for its
//! `grpc.health.v1` status, so a container healthcheck can run the binary
//! itself. Succeeds only on SERVING; anything else, or no answer within the
//! time limit, is an error.

use std::io::Write;

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::rpc_failure;
use crate::{config::HealthConfig, error::RunError, grpc, node::validate_url, tls::Tls};

pub async fn run_health(config: HealthConfig, out: &mut impl Write) -> Result<(), RunError> {
    validate_url("--addr", &config.addr)?;
    let tls = Tls::load(&config.tls)?;
    let endpoint = grpc::endpoint(&config.addr, tls.as_ref())?;
    let check = async {
        let channel = grpc::connect(endpoint, &config.addr, config.timeout).await?;
        let request = HealthCheckRequest {
            service: config.service.clone(),
        };
        HealthClient::new(channel)
            .check(request)
            .await
            .map_err(|status| {
                let hint = (status.code() == tonic::Code::Unimplemented).then(|| {
                    "it does not serve grpc.health.v1.Health; is this a muster server?".to_owned()
                });
                rpc_failure(&config.addr, &status, hint)
            })
    };
    let response = tokio::time::timeout(config.timeout, check)
        .await
        .map_err(|_| RunError::Rpc {
            url: config.addr.clone(),
            code: tonic::Code::DeadlineExceeded,
            message: format!(
                "no answer within {}",
                humantime::format_duration(config.timeout)
            ),
        })??;
    let status = response.into_inner().status();
    if status != ServingStatus::Serving {
        return Err(RunError::Unhealthy {
            url: config.addr,
            status: status.as_str_name(),
        });
    }
    writeln!(out, "{}", status.as_str_name())?;
    Ok(())
}
