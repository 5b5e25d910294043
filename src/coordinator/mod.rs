//! The coordinator process: loads the registry from the store, serves the
//! Coordinator service, proves reloaded nodes alive, sweeps silent and
//! expired nodes, and writes changes back.
//!
//! [`start`] binds the ports and starts every task, returning the bound
//! addresses in a [`RunningCoordinator`]; its `supervise` runs until shutdown
//! or until a task the coordinator cannot do without fails.
//!
//! The registry has one owner, [`Shared`], behind a short-held lock that is
//! never held across an `.await`. Every task is tracked, and shutdown runs
//! through one cancellation token: sessions end first, then the writer makes
//! its final flush.

mod admission;
mod lease_watch;
mod leases;
mod pool_service;
mod prober;
mod readiness;
mod service;
mod session;
mod sweeper;
mod watch;
mod writer;

use std::{
    net::SocketAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures::future::BoxFuture;
use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    auth::Token,
    clock::Moment,
    config::CoordinatorConfig,
    connections::{self, ConnectionLimits},
    dashboard,
    error::{RunError, ServiceError},
    grpc, limits,
    pool::{Pool, PoolConfig},
    proto::{self, coordinator_server::CoordinatorServer, pool_server::PoolServer},
    registry::{Registry, Timing},
    store::{DatabaseLock, EventSettings, Store},
    telemetry::{self, MetricsListener},
    tls::Tls,
};

pub use prober::{ProbeCredentials, ProbeOutcome, probe};
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

/// What the dashboard reads: the registry's view, and the event source
/// WatchNodes serves from.
struct DashboardFleet {
    registry: RegistryHandle,
    events: EventSource,
}

impl dashboard::Fleet for DashboardFleet {
    fn nodes(&self) -> proto::ListNodesResponse {
        self.registry.list_nodes()
    }

    fn watch(
        &self,
        since_revision: u64,
    ) -> BoxFuture<'static, Result<dashboard::NodeEvents, dashboard::WatchRefused>> {
        let events = self.events.clone();
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
    /// Required of Heartbeat streams (checked by the admission layer), and
    /// presented by Status probes.
    join_token: Option<Token>,
    /// Required of operator calls.
    admin_token: Option<Token>,
    /// Serves the coordinator, and dials agents for probes.
    tls: Option<Tls>,
    /// Held across each drain's store write and registry update, so that
    /// the registry applies drains in the order the store recorded them.
    drains: tokio::sync::Mutex<()>,
    /// The fleet's events, for watchers.
    events: EventSource,
    /// The VRAM lease pool.
    leases: Arc<leases::Leases>,
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
    sweeper: JoinHandle<()>,
    writer: JoinHandle<()>,
    lease_writer: JoinHandle<()>,
    lease_follower: JoinHandle<()>,
    writer_stop: CancellationToken,
    sessions: TaskTracker,
    background: TaskTracker,
    database_lock: DatabaseLock,
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
    let server = grpc::server(
        tls.as_ref(),
        grpc::COORDINATOR_KEEPALIVE,
        config.handshake_timeout,
    )?;
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
    let database_lock = DatabaseLock::acquire(&config.db, address).await?;
    let store = Store::open_with(
        &config.db,
        EventSettings {
            keep_events: config.event_history_events,
            keep_for: config.event_history_age,
            watcher_buffer: config.watch_buffer,
        },
    )
    .await?;
    let stored = store.load_nodes().await?;

    let reloaded = stored.len();
    let mut timing = Timing {
        heartbeat_interval: config.heartbeat_interval,
        max_heartbeats_per_second: config.max_heartbeats_per_second,
        offline_after: config.offline_after,
        expire_after: config.expire_after,
        reload_grace: config.offline_after,
        expiry_guard_fraction: config.expiry_guard_fraction,
    };
    // On top of its agent's backoff ceiling, each reloaded node gets the
    // usual allowance of a fleet this size.
    timing.reload_grace = timing.offline_after_at(timing.interval_for(reloaded));
    let mut registry = Registry::new(timing);
    registry.load(stored, Moment::now());
    // Reloaded nodes are UNKNOWN now, whatever the log last said of them.
    store.record_reload(registry.list()).await?;
    let pool = Pool::restore(
        PoolConfig {
            revoke_grace: config.revoke_grace,
            orphan_grace: config.lease_orphan_grace,
            ..PoolConfig::default()
        },
        store.load_leases().await?,
    )?;
    let (leases, lease_writes) = leases::Leases::new(pool);
    let boot_id = uuid::Uuid::new_v4().to_string();
    let registry = RegistryHandle::new(registry);
    let shared = Arc::new(Shared {
        changes_pending: registry.changes_pending.clone(),
        registry,
        timing,
        boot_id: boot_id.clone(),
        join_token,
        admin_token,
        tls,
        drains: tokio::sync::Mutex::new(()),
        events: EventSource::new(store.clone(), config.watch_bookmark_interval),
        store,
        leases,
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = readiness::Readiness::new(health).await;

    let sessions = TaskTracker::new();
    let background = TaskTracker::new();
    let writer_stop = CancellationToken::new();
    let writer = background.spawn(writer::run(
        shared.clone(),
        writer::flush_period(config.heartbeat_interval),
        writer_stop.clone(),
    ));
    let sweeper = background.spawn(sweeper::run(
        shared.clone(),
        sweeper::period(config.offline_after),
        config.expiry_guard_fraction,
        shutdown.clone(),
    ));
    let lease_writer = background.spawn_blocking({
        let store = shared.store.clone();
        let writer_stop = writer_stop.clone();
        move || leases::write(&store, lease_writes, &writer_stop)
    });
    let lease_follower = background.spawn(leases::follow(
        shared.leases.clone(),
        shared.registry.clone(),
        readiness.probe_round(),
        shutdown.clone(),
    ));
    background.spawn(prober::initial_round(
        shared.clone(),
        config.probe_timeout,
        PROBE_CONCURRENCY,
        readiness.clone(),
        shutdown.clone(),
    ));
    background.spawn(readiness::follow_store(
        readiness,
        shared.store.clone(),
        shutdown.clone(),
    ));

    let service =
        service::CoordinatorService::new(shared.clone(), sessions.clone(), shutdown.clone());
    let admission = admission::AdmissionLayer::new(
        config.max_streams,
        NonZeroU32::new(config.max_registrations_per_second).unwrap_or(NonZeroU32::MIN),
        shared.join_token.clone(),
    );
    let pool_service = pool_service::PoolService::new(
        shared.leases.clone(),
        shared.store.clone(),
        shared.admin_token.clone(),
        shutdown.clone(),
    );
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
                    registry: shared.registry.clone(),
                    events: shared.events.clone(),
                }),
                metrics,
                admin_token: shared.admin_token.clone(),
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
        reloaded,
        reload_grace = ?timing.reload_grace,
        db = %config.db.display(),
        tls = shared.tls.is_some(),
        join_token = shared.join_token.is_some(),
        admin_token = shared.admin_token.is_some(),
        max_connections = connection_limits.max_connections,
        "coordinator listening"
    );

    let serve = tokio::spawn(grpc::serve(
        router,
        listener,
        connection_limits,
        shutdown.clone(),
    ));
    Ok(RunningCoordinator {
        address,
        http_address,
        metrics_address,
        boot_id,
        shutdown,
        serve,
        sweeper,
        writer,
        lease_writer,
        lease_follower,
        writer_stop,
        sessions,
        background,
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
            mut sweeper,
            mut writer,
            mut lease_writer,
            mut lease_follower,
            writer_stop,
            sessions,
            background,
            database_lock,
            ..
        } = self;
        // The writers, the sweeper and the lease pool's follower end only
        // when told to. If one ends sooner it has panicked, and a coordinator
        // that can no longer persist, detect failures or keep its leases in
        // step with the fleet must not go on looking healthy.
        let mut sweeper_stopped = false;
        let mut follower_stopped = false;
        let mut serve_ended = false;
        let served = loop {
            tokio::select! {
                served = &mut serve => {
                    serve_ended = true;
                    break served.unwrap_or_else(|error| Err(RunError::TaskFailed {
                        task: "gRPC server",
                        reason: error.to_string(),
                    }));
                }
                ended = &mut sweeper, if !sweeper_stopped => {
                    sweeper_stopped = true;
                    if let Err(error) = ended {
                        break Err(RunError::TaskFailed { task: "sweeper", reason: error.to_string() });
                    }
                }
                ended = &mut writer => {
                    let reason = ended.err().map_or_else(|| "it stopped".to_owned(), |e| e.to_string());
                    break Err(RunError::TaskFailed { task: "store writer", reason });
                }
                ended = &mut lease_writer => {
                    let reason = ended.err().map_or_else(|| "it stopped".to_owned(), |e| e.to_string());
                    break Err(RunError::TaskFailed { task: "lease writer", reason });
                }
                ended = &mut lease_follower, if !follower_stopped => {
                    follower_stopped = true;
                    if !shutdown.is_cancelled() {
                        let reason = ended.err().map_or_else(|| "it stopped".to_owned(), |e| e.to_string());
                        break Err(RunError::TaskFailed { task: "lease pool follower", reason });
                    }
                }
            }
        };
        shutdown.cancel();
        // After a task failed, the server is still draining: it must stop
        // listening before the database lock is let go.
        if !serve_ended {
            let _ = serve.await;
        }
        sessions.close();
        sessions.wait().await;
        writer_stop.cancel();
        background.close();
        background.wait().await;
        drop(database_lock);
        info!("coordinator stopped");
        served
    }
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
