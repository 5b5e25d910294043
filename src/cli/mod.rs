//! Operator commands: `muster nodes list`, `get`, `remove`, `drain`,
//! `undrain` and `watch`, `muster health`, and `muster tls`.

mod health;
mod output;
mod tls;

use std::{io::Write, time::Duration};

use tokio::time::Instant;
use tonic::{Request, transport::Channel};

pub use health::run_health;
pub use tls::run_tls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
            let listed = operator
                .coordinator()
                .list_nodes(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner();
            output::write_nodes(out, client.output, &listed.nodes)?;
            // On stderr, so that stdout stays the table or the JSON array
            // that scripts already parse.
            if let Some(paused) = &listed.expiry_paused {
                output::write_expiry_note(&mut std::io::stderr().lock(), paused)?;
            }
        }
        NodesCommand::Get {
            node_id,
            wait,
            client,
        } => {
            let node = get_node(&client, node_id, wait).await?;
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
        NodesCommand::Watch { since, client } => watch(&client, since, out).await?,
    }
    Ok(())
}

/// The first pause before resuming a dropped watch, doubled after each
/// failed attempt up to [`WATCH_MAX_BACKOFF`].
const WATCH_FIRST_BACKOFF: Duration = Duration::from_millis(250);
const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Prints every event from `since` on, for as long as the process runs:
/// a dropped stream is resumed from the last revision printed, and a
/// revision the coordinator no longer holds is answered by listing the
/// fleet again from revision 0. Ends only on an error that retrying cannot
/// fix (a refused token, a bad address) or when stdout is closed.
async fn watch(
    client: &NodesClientConfig,
    since: u64,
    out: &mut impl Write,
) -> Result<(), RunError> {
    let mut resume_from = since;
    let mut backoff = WATCH_FIRST_BACKOFF;
    let mut database_id: Option<String> = None;
    output::write_event_header(out, client.output)?;
    loop {
        let mut printed_any = false;
        let attempt = async {
            let operator = Operator::connect(client).await?;
            let request = operator.request(proto::WatchNodesRequest {
                since_revision: resume_from,
            });
            let mut stream = operator
                .coordinator()
                .watch_nodes(request)
                .await
                .map_err(|status| operator.rpc_error(status))?
                .into_inner();
            loop {
                let event = stream
                    .message()
                    .await
                    .map_err(|status| operator.rpc_error(status))?;
                let Some(event) = event else {
                    return Err(RunError::Rpc {
                        url: client.coordinator.clone(),
                        code: tonic::Code::Unavailable,
                        message: "the watch ended without a status".to_owned(),
                    });
                };
                if let Some(known) = database_id.replace(event.database_id.clone())
                    && known != event.database_id
                    && resume_from != 0
                {
                    // Revisions of another database say nothing about ours.
                    return Err(RunError::Rpc {
                        url: client.coordinator.clone(),
                        code: tonic::Code::FailedPrecondition,
                        message: format!(
                            "the coordinator's database changed (database_id {known} is now {})",
                            event.database_id
                        ),
                    });
                }
                // A snapshot counts only once complete: resuming from its
                // revision halfway through would skip the nodes not printed.
                if event.kind != proto::NodeEventKind::Snapshot as i32 {
                    resume_from = event.revision;
                }
                output::write_event(out, client.output, &event)?;
                printed_any = true;
            }
        };
        let Err::<std::convert::Infallible, RunError>(failure) = attempt.await;
        match &failure {
            RunError::Rpc {
                code: tonic::Code::OutOfRange | tonic::Code::FailedPrecondition,
                message,
                ..
            } => {
                eprintln!("muster: {message}");
                eprintln!("muster: listing the fleet again from revision 0");
                resume_from = 0;
                continue;
            }
            RunError::Rpc {
                code:
                    tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::InvalidArgument
                    | tonic::Code::Unimplemented,
                ..
            } => return Err(failure),
            RunError::Rpc { .. }
            | RunError::Connect { .. }
            | RunError::ConnectTimeout { .. }
            | RunError::Dropped { .. } => {}
            _ => return Err(failure),
        }
        if printed_any {
            backoff = WATCH_FIRST_BACKOFF;
        }
        let pause = backoff.mul_f64(rand::random_range(0.5..=1.0));
        // Once events have flowed, a dropped connection is the coordinator
        // going away, not a TLS mismatch the generic advice suspects.
        let why = match &failure {
            RunError::Dropped { url, .. } if printed_any => {
                format!("{url} closed the connection")
            }
            other => other.to_string(),
        };
        eprintln!(
            "muster: watch interrupted ({why}); resuming after revision {resume_from} in {}",
            humantime::format_duration(Duration::from_millis(
                u64::try_from(pause.as_millis()).unwrap_or(u64::MAX)
            ))
        );
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(WATCH_MAX_BACKOFF);
    }
}

/// The node `node_id`; with `wait`, asked for again until it is registered
/// and the coordinator answers, for up to that long.
async fn get_node(
    client: &NodesClientConfig,
    node_id: String,
    wait: Option<Duration>,
) -> Result<proto::Node, RunError> {
    let deadline = wait.map(|wait| Instant::now() + wait);
    loop {
        let attempt = async {
            let operator = Operator::connect(client).await?;
            let request = operator.request(proto::GetNodeRequest {
                node_id: node_id.clone(),
            });
            operator
                .coordinator()
                .get_node(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| operator.rpc_error(status))
        };
        let failure = match attempt.await {
            Ok(node) => return Ok(node),
            Err(failure) => failure,
        };
        let worth_waiting = matches!(
            &failure,
            RunError::Connect { .. }
                | RunError::ConnectTimeout { .. }
                | RunError::Dropped { .. }
                | RunError::Rpc {
                    code: tonic::Code::NotFound | tonic::Code::Unavailable,
                    ..
                }
        );
        match deadline {
            Some(deadline) if worth_waiting && Instant::now() + health::RETRY_EVERY < deadline => {
                tokio::time::sleep(health::RETRY_EVERY).await;
            }
            _ => return Err(failure),
        }
    }
}

/// A connection to the coordinator, with the credentials to present.
struct Operator {
    url: String,
    channel: Channel,
    admin_token: Option<Token>,
    tls: Option<Tls>,
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
            tls,
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
        rpc_failure(&self.url, self.tls.as_ref(), &status, hint)
    }
}

/// A failed call to `url`, worded for the operator: `hint` where the caller
/// knows better than the server's message what went wrong.
///
/// A status with a source was made on this side from a broken connection,
/// not sent by the server. TLS servers break connections that way when a
/// client speaks plain HTTP/2 to them, or has no certificate they accept;
/// rustls's alert does not reach the status, so the advice follows from how
/// this process dialled.
fn rpc_failure(
    url: &str,
    tls: Option<&Tls>,
    status: &tonic::Status,
    hint: Option<String>,
) -> RunError {
    if std::error::Error::source(status).is_some() {
        let advice = match tls {
            None => {
                "if it speaks TLS, use an https:// URL and --tls-ca, the CA that signed its certificate"
            }
            Some(tls) if !tls.has_identity() => {
                "if it requires a client certificate (mutual TLS), pass --tls-cert and --tls-key"
            }
            Some(_) => {
                "if it requires a client certificate, check that --tls-cert was signed by the CA it trusts, for the clientAuth usage"
            }
        };
        return RunError::Dropped {
            url: url.to_owned(),
            advice: advice.to_owned(),
        };
    }
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
