//! Operator commands: `muster nodes list`, `get`, `remove`, `drain`,
//! `undrain` and `watch`, `muster leases`, `muster health`, and `muster tls`.
//!
//! `--coordinator` may list several coordinators ([`failover`]). A read
//! (`nodes list`, `get`, `watch`, `leases list`) is answered by the first
//! that answers: one that cannot be reached, or answers UNAVAILABLE, passes
//! it to the next. A write (`nodes remove`, `drain`, `undrain`, `leases
//! acquire`, `renew`, `release`) goes where a standby's UNAVAILABLE names
//! the leader (a URL of the list, at most [`failover::MAX_HINT_HOPS`] hints
//! in a row), and otherwise to the next URL; a write whose connection broke
//! after it was sent is not sent again elsewhere, as it may have been
//! applied. Each move is said in one line on stderr. With one URL nothing
//! changes.

mod health;
mod leases;
mod output;
mod tls;

use std::{future::Future, io::Write, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Status, transport::Channel};

pub use health::run_health;
pub use leases::run_leases;
pub use tls::run_tls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

use crate::{
    auth::Token,
    config::{NodesClientConfig, NodesCommand},
    error::RunError,
    failover::{self, CoordinatorUrls, Cursor},
    grpc,
    proto::{self, coordinator_client::CoordinatorClient, pool_client::PoolClient},
    tls::Tls,
};

pub async fn run_nodes(command: NodesCommand, out: &mut impl Write) -> Result<(), RunError> {
    match command {
        NodesCommand::List(client) => {
            let listed = Operators::new(&client)?
                .call(Access::Read, |operator| async move {
                    let request = operator.request(proto::ListNodesRequest {});
                    operator.coordinator().list_nodes(request).await
                })
                .await?;
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
            let removed = Operators::new(&client)?
                .call(Access::Write, |operator| {
                    let request = operator.request(proto::RemoveNodeRequest {
                        node_id: node_id.clone(),
                    });
                    async move { operator.coordinator().remove_node(request).await }
                })
                .await?;
            if let Some(node) = removed.node {
                output::write_node(out, client.output, &node)?;
            }
        }
        NodesCommand::Drain {
            node_id,
            reason,
            client,
        } => {
            let node = Operators::new(&client)?
                .call(Access::Write, |operator| {
                    let request = operator.request(proto::DrainNodeRequest {
                        node_id: node_id.clone(),
                        reason: reason.clone(),
                    });
                    async move { operator.coordinator().drain_node(request).await }
                })
                .await?;
            output::write_node(out, client.output, &node)?;
        }
        NodesCommand::Undrain { node_id, client } => {
            let node = Operators::new(&client)?
                .call(Access::Write, |operator| {
                    let request = operator.request(proto::UndrainNodeRequest {
                        node_id: node_id.clone(),
                    });
                    async move { operator.coordinator().undrain_node(request).await }
                })
                .await?;
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
/// fleet again from revision 0. A watch that fails moves on to the next
/// coordinator of the list. Ends only on an error that retrying cannot
/// fix (a refused token, a bad address) or when stdout is closed.
async fn watch(
    client: &NodesClientConfig,
    since: u64,
    out: &mut impl Write,
) -> Result<(), RunError> {
    let mut resume_from = since;
    let mut backoff = WATCH_FIRST_BACKOFF;
    let mut database_id: Option<String> = None;
    let operators = Operators::new(client)?;
    let mut cursor = Cursor::new(&operators.urls);
    output::write_event_header(out, client.output)?;
    loop {
        let mut printed_any = false;
        let url = operators.urls.get(cursor.current()).to_owned();
        let attempt = async {
            let operator = operators.connect(cursor.current()).await?;
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
                        url: url.clone(),
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
                        url: url.clone(),
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
            cursor.succeeded();
        }
        let next = cursor.after_failure(&operators.urls, None).to();
        let pause = backoff.mul_f64(rand::random_range(0.5..=1.0));
        // Once events have flowed, a dropped connection is the coordinator
        // going away, not a TLS mismatch the generic advice suspects.
        let why = match &failure {
            RunError::Dropped { url, .. } if printed_any => {
                format!("{url} closed the connection")
            }
            other => other.to_string(),
        };
        let pause_text = humantime::format_duration(Duration::from_millis(
            u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
        ));
        if operators.urls.len() > 1 {
            eprintln!(
                "muster: watch interrupted ({why}); resuming after revision {resume_from} from {} in {pause_text}",
                operators.urls.get(next)
            );
        } else {
            eprintln!(
                "muster: watch interrupted ({why}); resuming after revision {resume_from} in {pause_text}"
            );
        }
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
    let operators = Operators::new(client)?;
    loop {
        let attempt = operators.call(Access::Read, |operator| {
            let request = operator.request(proto::GetNodeRequest {
                node_id: node_id.clone(),
            });
            async move { operator.coordinator().get_node(request).await }
        });
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

/// What a call does, which decides which coordinators may answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Any coordinator, a standby too, may answer.
    Read,
    /// Only the leader applies it; a standby names the leader.
    Write,
}

/// The coordinators of `--coordinator`, with the credentials to present.
struct Operators {
    urls: CoordinatorUrls,
    admin_token: Option<Token>,
    tls: Option<Tls>,
}

impl Operators {
    fn new(client: &NodesClientConfig) -> Result<Self, RunError> {
        let urls = CoordinatorUrls::parse("--coordinator", &client.coordinator)?;
        let admin_token = match &client.admin_token {
            Some(token) => Some(token.clone()),
            None => {
                Token::from_optional_file("--admin-token-file", client.admin_token_file.as_deref())?
            }
        };
        let tls = Tls::load(&client.tls)?;
        for url in urls.urls() {
            grpc::endpoint(url, tls.as_ref())?;
        }
        Ok(Self {
            urls,
            admin_token,
            tls,
        })
    }

    /// A connection to the coordinator at `index` of the list.
    async fn connect(&self, index: usize) -> Result<Operator, RunError> {
        let url = self.urls.get(index);
        let endpoint = grpc::endpoint(url, self.tls.as_ref())?;
        let channel = grpc::connect(endpoint, url, CONNECT_TIMEOUT).await?;
        Ok(Operator {
            url: url.to_owned(),
            channel,
            admin_token: self.admin_token.clone(),
            tls: self.tls.clone(),
        })
    }

    /// Makes `call` on the coordinators of the list as `access` allows (see
    /// the module docs) until one answers, or all have failed; the error is
    /// then the last coordinator's.
    async fn call<T, F, Fut>(&self, access: Access, mut call: F) -> Result<T, RunError>
    where
        F: FnMut(Operator) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut cursor = Cursor::new(&self.urls);
        let mut unhinted_moves = 0;
        loop {
            let (failure, hint) = match self.connect(cursor.current()).await {
                Ok(operator) => match call(operator.clone()).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) if elsewhere(access, &status) => {
                        let hint = (access == Access::Write)
                            .then(|| failover::leader_hint(&status))
                            .flatten();
                        (operator.rpc_error(status), hint)
                    }
                    Err(status) => return Err(operator.rpc_error(status)),
                },
                Err(
                    failure @ (RunError::Connect { .. }
                    | RunError::ConnectTimeout { .. }
                    | RunError::Dropped { .. }),
                ) => (failure, None),
                Err(failure) => return Err(failure),
            };
            let switch = cursor.after_failure(&self.urls, hint.as_deref());
            if !switch.immediate() {
                unhinted_moves += 1;
                if unhinted_moves >= self.urls.len() {
                    return Err(failure);
                }
            }
            eprintln!(
                "muster: {failure}; asking {} ({})",
                self.urls.get(switch.to()),
                switch.reason()
            );
        }
    }
}

/// Whether a call that failed with `status` may be made on another
/// coordinator: one a standby refused, and a read whose connection broke.
/// A write whose connection broke may have been applied, and is not sent
/// again.
fn elsewhere(access: Access, status: &Status) -> bool {
    let broken = std::error::Error::source(status).is_some();
    match access {
        Access::Read => broken || status.code() == tonic::Code::Unavailable,
        Access::Write => !broken && status.code() == tonic::Code::Unavailable,
    }
}

/// A connection to one coordinator, with the credentials to present.
#[derive(Clone)]
struct Operator {
    url: String,
    channel: Channel,
    admin_token: Option<Token>,
    tls: Option<Tls>,
}

impl Operator {
    fn coordinator(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel.clone())
            .max_decoding_message_size(grpc::MAX_RESPONSE_BYTES)
    }

    fn pool(&self) -> PoolClient<Channel> {
        PoolClient::new(self.channel.clone()).max_decoding_message_size(grpc::MAX_RESPONSE_BYTES)
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
            _ => failover::leader_hint(&status).map(|leader| {
                format!(
                    "{}; the leader is {leader} (add it to --coordinator)",
                    status.message()
                )
            }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_move_on_after_any_failure_to_answer_and_writes_only_after_a_refusal() {
        let refused = Status::unavailable("standby");
        let broken = Status::from_error(Box::new(std::io::Error::other("reset")));
        let denied = Status::permission_denied("no");
        assert!(elsewhere(Access::Read, &refused));
        assert!(elsewhere(Access::Read, &broken));
        assert!(!elsewhere(Access::Read, &denied));
        assert!(elsewhere(Access::Write, &refused));
        assert!(
            !elsewhere(Access::Write, &broken),
            "a write whose connection broke may have been applied"
        );
        assert!(!elsewhere(Access::Write, &denied));
    }
}
