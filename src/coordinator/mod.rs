//! The coordinator process: loads the registry from the store, serves the
//! Coordinator service, proves reloaded nodes alive, sweeps silent and
//! expired nodes, and writes changes back.
//!
//! [`start`] binds the ports and starts every task, returning the bound
//! addresses in a [`RunningCoordinator`]; its `supervise` runs until shutdown
//! or until a task the coordinator cannot do without fails.
//!
//! Several coordinators may share one database that arbitrates leadership
//! (`leadership`): one leads, the others stand by. The process (its ports,
//! its store, its server) lives through every change of role; what only the
//! leader runs is a [`term`] under a child cancellation token. On a
//! database that arbitrates nothing (SQLite) the process leads one term at
//! epoch 0 until shutdown.
//!
//! The registry has one owner, [`Shared`], behind a short-held lock that is
//! never held across an `.await`. Every task is tracked, and shutdown runs
//! through one cancellation token: sessions end first, then the writer makes
//! its final flush.

mod admission;
mod leadership;
mod lease_watch;
mod leases;
mod pool_service;
mod prober;
mod readiness;
mod role;
mod service;
mod session;
mod standby;
mod sweeper;
mod term;
mod watch;
mod writer;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
};

use futures::future::BoxFuture;
use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    auth::Token,
    config::CoordinatorConfig,
    connections::{self, ConnectionLimits},
    dashboard,
    error::{InvalidInput, RunError, ServiceError},
    grpc, limits,
    proto::{self, coordinator_server::CoordinatorServer, pool_server::PoolServer},
    registry::{Registry, Timing},
    store::{Campaign, DatabaseLock, EventSettings, Store},
    telemetry::{self, MetricsListener},
    tls::Tls,
};

pub use prober::{ProbeCredentials, ProbeOutcome, probe};
pub use readiness::{COORDINATOR_HEALTH, READS_HEALTH};
pub use session::read_registration;
pub use watch::{EventSource, Watch};

/// How many Status probes run at once after a restart.
const PROBE_CONCURRENCY: usize = 256;

/// The registry behind its short-held lock: what a session needs of the
/// coordinator, and all it gets.
#[derive(Clone)]
pub(crate) struct RegistryHandle {
    registry: Arc<Mutex<Registry>>,
    /// Woken when the registry has changes for the store.
    changes_pending: Arc<Notify>,
    /// Woken when the registry's facts version moves: something the lease
    /// pool follows changed.
    facts_moved: Arc<Notify>,
}

impl RegistryHandle {
    fn new(registry: Registry) -> Self {
        Self {
            registry: Arc::new(Mutex::new(registry)),
            changes_pending: Arc::new(Notify::new()),
            facts_moved: Arc::new(Notify::new()),
        }
    }

    /// Runs `update` under the registry lock, and wakes the writer if the
    /// update left changes for the store, and the lease pool's follower if
    /// it changed what the pool follows.
    fn update<R>(&self, update: impl FnOnce(&mut Registry) -> R) -> R {
        let mut registry = self.lock();
        let facts_before = registry.facts_version();
        let result = update(&mut registry);
        let pending = registry.has_changes();
        let facts_moved = registry.facts_version() != facts_before;
        drop(registry);
        if pending {
            self.changes_pending.notify_one();
        }
        if facts_moved {
            self.facts_moved.notify_one();
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every node, as ListNodes answers; the lock is held only to copy.
    fn list_nodes(&self) -> proto::ListNodesResponse {
        let (nodes, guard, timing) = {
            let registry = self.lock();
            (registry.list(), registry.expiry_guard(), registry.timing())
        };
        proto::ListNodesResponse {
            nodes: nodes.into_iter().map(proto::Node::from).collect(),
            expiry_paused: guard.paused.then_some(proto::ExpiryPaused {
                nodes_down: guard.down as u64,
                nodes_known: guard.known as u64,
                guard_fraction: timing.expiry_guard_fraction,
            }),
        }
    }
}

/// What the dashboard reads: the leader's registry or a standby's rows,
/// and the event source WatchNodes serves from.
struct DashboardFleet {
    process: Arc<Process>,
}

impl dashboard::Fleet for DashboardFleet {
    fn nodes(&self) -> proto::ListNodesResponse {
        match self.process.leader() {
            Ok(shared) => shared.registry.list_nodes(),
            Err(_) => self.process.standby_rows.get(),
        }
    }

    fn watch(
        &self,
        since_revision: u64,
    ) -> BoxFuture<'static, Result<dashboard::NodeEvents, dashboard::WatchRefused>> {
        let events = self.process.events.clone();
        Box::pin(async move {
            let watch = events
                .watch(since_revision)
                .await
                .map_err(|refused| match refused {
                    ServiceError::HistoryPruned { .. } | ServiceError::RevisionAhead { .. } => {
                        dashboard::WatchRefused::OutOfRange(refused.to_string())
                    }
                    other => dashboard::WatchRefused::Unavailable(other.to_string()),
                })?;
            // The watch's error is its last item.
            let events = futures::stream::unfold(Some(watch), |watch| async move {
                let mut watch = watch?;
                match watch.next().await {
                    Ok(event) => Some((Ok(event), Some(watch))),
                    Err(ended) => Some((Err(ended.to_string()), None)),
                }
            });
            Ok(Box::pin(events) as dashboard::NodeEvents)
        })
    }
}

/// What lives as long as the process, whatever its role.
pub(crate) struct Process {
    config: CoordinatorConfig,
    store: Store,
    roles: role::Roles,
    readiness: Arc<readiness::Readiness>,
    events: EventSource,
    /// Random for every start; also this process's leadership holder.
    boot_id: String,
    join_token: Option<Token>,
    admin_token: Option<Token>,
    tls: Option<Tls>,
    /// The term being led, if this process leads.
    current: RwLock<Option<Arc<Shared>>>,
    /// A standby's view of the rows, for its dashboard.
    standby_rows: Arc<standby::RowsView>,
    /// Watches, which outlive a change of role.
    watches: TaskTracker,
    background: TaskTracker,
    shutdown: CancellationToken,
}

impl Process {
    /// The term this process leads, or why it serves no leader's call.
    fn leader(&self) -> Result<Arc<Shared>, ServiceError> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current.clone().ok_or_else(|| self.roles.refusal())
    }

    fn begin_leading(&self, shared: &Arc<Shared>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(shared.clone());
        self.roles.lead(shared.epoch);
    }

    fn stop_leading(&self, leader: Option<&crate::store::Leader>, why: &str) {
        self.roles.follow(leader, why);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// State shared by the service, its sessions and the background tasks.
pub(crate) struct Shared {
    registry: RegistryHandle,
    /// The registry's timing, which sessions judge silence by.
    timing: Timing,
    store: Store,
    /// Woken when the registry has changes for the store (the registry
    /// handle's own).
    changes_pending: Arc<Notify>,
    boot_id: String,
    /// The leadership epoch of this term, sent in `registered`.
    epoch: u64,
    /// Required of Heartbeat streams (checked by the admission layer), and
    /// presented by Status probes.
    join_token: Option<Token>,
    /// Serves the coordinator, and dials agents for probes.
    tls: Option<Tls>,
    /// Held across each drain's store write and registry update, so that
    /// the registry applies drains in the order the store recorded them.
    drains: tokio::sync::Mutex<()>,
    /// The VRAM lease pool.
    leases: Arc<leases::Leases>,
    /// Says why a session ends when the term does.
    roles: role::Roles,
    /// The term's Heartbeat sessions.
    sessions: TaskTracker,
    /// Cancelled when the term ends: sessions, sweeper, prober, pool.
    stop: CancellationToken,
    deposal: term::Deposal,
}

impl Shared {
    /// Runs `update` under the registry lock, and wakes the writer if the
    /// update left changes for the store.
    fn update<R>(&self, update: impl FnOnce(&mut Registry) -> R) -> R {
        self.registry.update(update)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock()
    }

    /// A store error as the service reports it; a fenced write deposes the
    /// term.
    fn store_failed(&self, error: crate::store::StoreError) -> ServiceError {
        if self.deposal.notice(&error) {
            return ServiceError::NotLeader { leader: None };
        }
        ServiceError::Store(error)
    }
}

/// A coordinator that has bound its ports and started its tasks; it serves
/// until [`RunningCoordinator::supervise`] sees `shutdown` cancelled or a
/// task fail.
pub struct RunningCoordinator {
    /// The address the Coordinator service listens on.
    pub address: SocketAddr,
    /// The address of the HTTP listener (dashboard, `/api/nodes`,
    /// `/events`, `/metrics`), unless `--http-listen off`.
    pub http_address: Option<SocketAddr>,
    /// The address `/metrics` is served on by the deprecated
    /// `--metrics-listen`, when asked for.
    pub metrics_address: Option<SocketAddr>,
    /// Random for every start, as `registered` messages carry it.
    pub boot_id: String,
    shutdown: CancellationToken,
    serve: JoinHandle<Result<(), RunError>>,
    leadership: JoinHandle<Result<(), RunError>>,
    process: Arc<Process>,
    /// The SQLite file's lock; PostgreSQL needs none.
    database_lock: Option<DatabaseLock>,
}

/// Runs a coordinator until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    start(config, shutdown).await?.supervise().await
}

/// Loads the registry, binds the service's port (and the metrics port, if
/// configured) and starts serving and the background tasks. Cancelling
/// `shutdown` stops it all; [`RunningCoordinator::supervise`] waits for that.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<RunningCoordinator, RunError> {
    config.validate()?;
    // Every agent holds a connection, and every connection is a file. The
    // outcome is logged with the "listening" line: nothing is logged before
    // a start-up error, which stays the one line on stderr.
    let open_files = limits::raise_open_files();
    let connection_limits =
        connection_limits(&config, open_files.as_ref().ok().map(|files| files.soft));
    let join_token =
        Token::from_optional_file("--join-token-file", config.join_token_file.as_deref())?;
    let admin_token =
        Token::from_optional_file("--admin-token-file", config.admin_token_file.as_deref())?;
    let tls = Tls::load(&config.tls)?;
    // Ports first: a coordinator that cannot listen leaves no database file
    // behind, and the lock file can name the address that holds it.
    let (listener, address) = grpc::bind(config.listen).await?;
    let http = match config.http_listen.0 {
        Some(http_address) => Some((dashboard::bind(http_address).await?, telemetry::recorder()?)),
        None => None,
    };
    let metrics = match config.metrics_listen {
        Some(metrics_address) => Some(telemetry::bind(metrics_address).await?),
        None => None,
    };
    // Held until supervision ends; the kernel releases it if the process
    // dies.
    let database_lock = match config.db.sqlite_path() {
        Some(path) => Some(DatabaseLock::acquire(path, address).await?),
        None => None,
    };
    let store = Store::open_with(
        config.db.clone(),
        EventSettings {
            keep_events: config.event_history_events,
            keep_for: config.event_history_age,
            watcher_buffer: config.watch_buffer,
        },
    )
    .await?;
    let own_url = advertised_url(
        &config,
        address,
        tls.is_some(),
        store.arbitrates_leadership(),
    )?;
    let roles = role::Roles::new(own_url, shutdown.clone());
    let server = grpc::server_in_role(
        tls.as_ref(),
        grpc::COORDINATOR_KEEPALIVE,
        config.handshake_timeout,
        roles.clone().into(),
    )?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = readiness::Readiness::new(health).await;
    let boot_id = uuid::Uuid::new_v4().to_string();
    let process = Arc::new(Process {
        events: EventSource::new(store.clone(), config.watch_bookmark_interval),
        store,
        roles,
        readiness: readiness.clone(),
        boot_id: boot_id.clone(),
        join_token,
        admin_token,
        tls,
        current: RwLock::new(None),
        standby_rows: Arc::default(),
        watches: TaskTracker::new(),
        background: TaskTracker::new(),
        shutdown: shutdown.clone(),
        config,
    });
    let config = &process.config;

    take_over_from_a_predecessor(&process).await?;
    let sent = tokio::time::Instant::now();
    let first = match process
        .store
        .campaign(&boot_id, process.roles.own_url(), config.leader_lease)
        .await?
    {
        Campaign::Won { epoch } => {
            process.store.fence(epoch);
            let term = term::Term::start(&process, epoch).await?;
            process.begin_leading(&term.shared);
            Some(leadership::Leading {
                term,
                lease: leadership::LeaseClock::granted(config.leader_lease, sent),
            })
        }
        Campaign::Lost { leader } => {
            process
                .roles
                .follow(leader.as_ref(), "another coordinator leads");
            process.readiness.standby_database(true).await;
            None
        }
    };
    process.background.spawn(readiness::follow_store(
        readiness,
        process.store.clone(),
        shutdown.clone(),
    ));

    let service = service::CoordinatorService::new(process.clone());
    let admission = admission::AdmissionLayer::new(
        config.max_streams,
        NonZeroU32::new(config.max_registrations_per_second).unwrap_or(NonZeroU32::MIN),
        process.join_token.clone(),
    );
    let pool_service = pool_service::PoolService::new(process.clone());
    let mut server = server;
    let router = server
        .add_service(health_service)
        .add_service(tower::Layer::layer(
            &admission,
            CoordinatorServer::new(service).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES),
        ))
        .add_service(
            PoolServer::new(pool_service).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES),
        );
    let router = grpc::with_reflection(router, &["muster.v1.Coordinator", "muster.v1.Pool"])?;
    let background = &process.background;
    let metrics_address = metrics.as_ref().map(MetricsListener::local_address);
    if let Some(metrics) = metrics {
        background.spawn(telemetry::serve(metrics, shutdown.clone()));
    }
    let http_address = http.as_ref().map(|(listener, _)| listener.local_address());
    if let Some((listener, metrics)) = http {
        info!(
            http_address = %listener.local_address(),
            "serving the dashboard at http://{}/",
            listener.local_address()
        );
        background.spawn(dashboard::serve(
            listener,
            dashboard::Sources {
                fleet: Arc::new(DashboardFleet {
                    process: process.clone(),
                }),
                metrics,
                admin_token: process.admin_token.clone(),
            },
            shutdown.clone(),
        ));
    }
    match open_files {
        Ok(files) => info!(soft = files.soft, hard = files.hard, "open-file limit"),
        Err(error) => warn!(%error, "cannot raise the open-file limit"),
    }
    info!(
        %address,
        http_address = %config.http_listen.bound(http_address),
        %boot_id,
        role = process.roles.role().as_str(),
        advertise_url = %process.roles.own_url(),
        db = %config.db,
        tls = process.tls.is_some(),
        join_token = process.join_token.is_some(),
        admin_token = process.admin_token.is_some(),
        max_connections = connection_limits.max_connections,
        "coordinator listening"
    );

    let serve = tokio::spawn(grpc::serve(
        router,
        listener,
        connection_limits,
        shutdown.clone(),
    ));
    let leadership = tokio::spawn(leadership::run(process.clone(), first));
    Ok(RunningCoordinator {
        address,
        http_address,
        metrics_address,
        boot_id,
        shutdown,
        serve,
        leadership,
        process,
        database_lock,
    })
}

impl RunningCoordinator {
    /// Runs until `shutdown` is cancelled or a task the coordinator cannot
    /// do without fails, then shuts down in order: sessions end first, then
    /// the writer makes its final flush.
    pub async fn supervise(self) -> Result<(), RunError> {
        let Self {
            shutdown,
            mut serve,
            mut leadership,
            process,
            database_lock,
            ..
        } = self;
        // The leadership task ends only at shutdown, or when a task the
        // coordinator cannot do without has failed: a coordinator that can
        // no longer persist or detect failures must not go on looking
        // healthy.
        let mut serve_ended = false;
        let mut led = None;
        let served = tokio::select! {
            served = &mut serve => {
                serve_ended = true;
                served.unwrap_or_else(|error| Err(RunError::TaskFailed {
                    task: "gRPC server",
                    reason: error.to_string(),
                }))
            }
            ended = &mut leadership => {
                led = Some(ended.unwrap_or_else(|error| Err(RunError::TaskFailed {
                    task: "leadership",
                    reason: error.to_string(),
                })));
                Ok(())
            }
        };
        shutdown.cancel();
        // After a task failed, the server is still draining: it must stop
        // listening before the database lock is let go.
        let served = if serve_ended {
            served
        } else {
            serve.await.unwrap_or_else(|error| {
                Err(RunError::TaskFailed {
                    task: "gRPC server",
                    reason: error.to_string(),
                })
            })
        };
        // Sessions end first, then the writer makes its final flush.
        let led = match led {
            Some(led) => led,
            None => leadership.await.unwrap_or_else(|error| {
                Err(RunError::TaskFailed {
                    task: "leadership",
                    reason: error.to_string(),
                })
            }),
        };
        process.watches.close();
        process.watches.wait().await;
        process.background.close();
        process.background.wait().await;
        drop(database_lock);
        info!("coordinator stopped");
        led.and(served)
    }
}

/// A coordinator need not wait out a lease whose holder is certainly gone:
/// one restarted at its own address (this process holds the holder's port),
/// or a leader at whose address nothing listens any more (the connection is
/// refused, not merely unanswered). The lease is resigned on its behalf and
/// the campaign that follows wins at once, at a new epoch. Only at start;
/// were the leader alive after all, fencing would refuse its next write.
async fn take_over_from_a_predecessor(process: &Process) -> Result<(), RunError> {
    if !process.store.arbitrates_leadership() {
        return Ok(());
    }
    let Some(previous) = process.store.leader().await? else {
        return Ok(());
    };
    if previous.holder == process.boot_id || previous.expires_in.is_zero() {
        return Ok(());
    }
    let gone = if previous.url == process.roles.own_url() {
        "this coordinator's previous process, whose port this one holds"
    } else if nothing_listens_at(&previous.url).await {
        "a coordinator at whose address nothing listens any more"
    } else {
        return Ok(());
    };
    info!(
        epoch = previous.epoch,
        leader_url = %previous.url,
        "the lease is held by {gone}; resigning it"
    );
    process
        .store
        .resign_leadership(&previous.holder, previous.epoch)
        .await?;
    Ok(())
}

/// Whether a TCP connection to `url`'s address is refused: nothing listens
/// there. A timeout or an unreachable network proves nothing.
async fn nothing_listens_at(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let dial = tokio::net::TcpStream::connect((host, port));
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), dial).await,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// This coordinator's URL for agents and operators (see
/// `--advertise-url`). Where several coordinators share the database it
/// must reach this one from elsewhere, so an unspecified listen address
/// needs the flag; otherwise loopback stands in for it.
fn advertised_url(
    config: &CoordinatorConfig,
    address: SocketAddr,
    tls: bool,
    shared_database: bool,
) -> Result<String, RunError> {
    if let Some(url) = config.advertised_url(address, tls) {
        return Ok(url);
    }
    if shared_database {
        return Err(InvalidInput::new(
            "--advertise-url",
            format!(
                "is required when several coordinators share the database and --listen is {address}: give the URL at which agents and operators reach this coordinator, such as http://10.0.0.5:{}",
                address.port()
            ),
        )
        .into());
    }
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port());
    Ok(config
        .advertised_url(loopback, tls)
        .unwrap_or_else(|| loopback.to_string()))
}

/// The connection limits from the flags; without `--max-connections`, as
/// many as the open-file limit allows with a reserve kept free.
fn connection_limits(config: &CoordinatorConfig, open_files: Option<u64>) -> ConnectionLimits {
    let derived = ConnectionLimits::for_open_files(open_files.unwrap_or(1_024));
    let max_connections = config.max_connections.unwrap_or(derived.max_connections);
    if max_connections > derived.max_connections {
        warn!(
            max_connections,
            fits = derived.max_connections,
            "--max-connections leaves fewer than {} open files for the database and probes",
            connections::RESERVED_FILES
        );
    }
    ConnectionLimits {
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.idle_timeout,
        max_connections,
    }
}
