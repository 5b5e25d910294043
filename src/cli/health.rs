//! `muster health`: asks a coordinator or an agent for its
//! `grpc.health.v1` status, so a container healthcheck can run the binary
//! itself. Succeeds only on SERVING; anything else, or no answer within the
//! time limit, is an error. With `--wait`, it asks again until SERVING or
//! the wait is over, so a script can start a server and go on once it is
//! ready.

use std::{io::Write, time::Duration};

use tokio::time::Instant;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::rpc_failure;
use crate::{
    config::HealthConfig,
    error::{RunError, display_chain},
    grpc,
    node::validate_url,
    tls::Tls,
};

/// Pause between two checks while waiting.
pub(super) const RETRY_EVERY: Duration = Duration::from_millis(100);

pub async fn run_health(config: HealthConfig, out: &mut impl Write) -> Result<(), RunError> {
    validate_url("--addr", &config.addr)?;
    let tls = Tls::load(&config.tls)?;
    let started = Instant::now();
    let deadline = config.wait.map(|wait| started + wait);
    loop {
        let limit = match deadline {
            Some(deadline) => config
                .timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(RETRY_EVERY),
            None => config.timeout,
        };
        let failure = match check(&config, tls.as_ref(), limit).await {
            Ok(ServingStatus::Serving) => {
                writeln!(out, "{}", ServingStatus::Serving.as_str_name())?;
                return Ok(());
            }
            Ok(status) => RunError::Unhealthy {
                url: config.addr.clone(),
                status: status.as_str_name(),
            },
            Err(error) => error,
        };
        match (deadline, config.wait) {
            (Some(deadline), Some(_)) if Instant::now() + RETRY_EVERY < deadline => {
                tokio::time::sleep(RETRY_EVERY).await;
            }
            (Some(_), Some(waited)) => {
                return Err(RunError::NotReady {
                    url: config.addr,
                    waited,
                    last: display_chain(&failure),
                });
            }
            _ => return Err(failure),
        }
    }
}

/// One check within `limit`, connecting included.
async fn check(
    config: &HealthConfig,
    tls: Option<&Tls>,
    limit: Duration,
) -> Result<ServingStatus, RunError> {
    let endpoint = grpc::endpoint(&config.addr, tls)?;
    let call = async {
        let channel = grpc::connect(endpoint, &config.addr, limit).await?;
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
                rpc_failure(&config.addr, tls, &status, hint)
            })
    };
    let response = tokio::time::timeout(limit, call)
        .await
        .map_err(|_| RunError::Rpc {
            url: config.addr.clone(),
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer within {}", humantime::format_duration(limit)),
        })??;
    Ok(response.into_inner().status())
}
