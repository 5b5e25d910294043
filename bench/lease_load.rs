//! Load test of the Pool service through gRPC: acquire+release pairs
//! against a running coordinator whose fleet has GPUs (`muster swarm
//! --gpus-per-agent 8`), for `--duration`. Every acquisition waits for its
//! commit, as a real client does. Prints pairs per second and the acquire
//! and release latency percentiles, and fails if any call failed.
//!
//! Two ways to load it:
//! - closed loop (default): `--workers` loops, each starting its next pair
//!   when the last is answered, so the coordinator runs saturated and the
//!   latency is mostly its queue (Little's law: workers / throughput);
//! - paced (`--rate N`): pairs start on a fixed schedule of N per second,
//!   whatever the answers do, at most `--workers` in flight. Latency is
//!   counted from the moment the schedule meant a pair to start, not from
//!   when it could, so a stalled coordinator shows in the percentiles
//!   instead of slowing the load down (no coordinated omission).
//!
//! `cargo run --release --example lease_load -- --coordinator http://127.0.0.1:7700 --rate 5000 --duration 30s`

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use muster::proto::{self, pool_client::PoolClient};
use tokio::sync::{Mutex, Semaphore};
use tonic::{Request, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// Acquire+release loops running at once; with `--rate`, the most pairs
    /// in flight.
    #[arg(long, default_value_t = 256)]
    workers: usize,
    /// Start this many pairs per second on a fixed schedule instead of
    /// running closed loops.
    #[arg(long)]
    rate: Option<u32>,
    /// Two health checks per pair instead of a lease: the cost of a call
    /// that does no work, the floor a lease call is compared with.
    #[arg(long)]
    health_checks: bool,
    /// HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// VRAM each lease asks for, MiB.
    #[arg(long, default_value_t = 1_024)]
    mb: u64,
    /// How long to wait for the fleet's GPUs to reach the pool first.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ready_within: Duration,
    /// The admin token, when the coordinator requires one.
    #[arg(long, env = "MUSTER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

#[derive(Default)]
struct Samples {
    acquire: Vec<Duration>,
    release: Vec<Duration>,
    failures: Vec<String>,
}

/// What a pair is made of: a lease, or (`--health-checks`) two calls that
/// do no work.
enum Calls {
    Leases(PoolClient<Channel>),
    HealthChecks(HealthClient<Channel>),
}

impl Calls {
    fn new(channel: Channel, health_checks: bool) -> Self {
        if health_checks {
            Self::HealthChecks(HealthClient::new(channel))
        } else {
            Self::Leases(PoolClient::new(channel))
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lease_load: {error}");
            ExitCode::FAILURE
        }
    }
}

fn request<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn acquire_request(request_id: String, mb: u64, wait: Duration) -> proto::AcquireLeaseRequest {
    proto::AcquireLeaseRequest {
        request_id,
        holder: "lease_load".to_owned(),
        mb,
        ttl: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        wait: prost_types::Duration::try_from(wait).ok(),
        ..proto::AcquireLeaseRequest::default()
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(args.coordinator.clone())
            .map_err(|error| format!("--coordinator: {error}"))?
            .connect()
            .await
            .map_err(|error| format!("cannot connect to {}: {error}", args.coordinator))?;
        channels.push(channel);
    }
    let token = args.admin_token.as_deref();

    // One lease first, waiting for the fleet's GPUs to reach the pool.
    let mut client = PoolClient::new(channels[0].clone());
    let probe = client
        .acquire_lease(request(
            acquire_request(uuid::Uuid::new_v4().to_string(), args.mb, args.ready_within),
            token,
        ))
        .await
        .map_err(|status| format!("the first acquisition failed: {status:?}"))?
        .into_inner();
    client
        .release_lease(request(
            proto::ReleaseLeaseRequest {
                lease_id: probe.lease_id,
            },
            token,
        ))
        .await
        .map_err(|status| format!("the first release failed: {status:?}"))?;

    let samples = Arc::new(Mutex::new(Samples::default()));
    let started = Instant::now();
    let until = started + args.duration;
    match args.rate {
        None => closed_loops(&args, &channels, &samples, until).await?,
        Some(rate) => paced(&args, rate, &channels, &samples, until).await?,
    }
    let elapsed = started.elapsed();
    let mut samples = Arc::try_unwrap(samples)
        .map_err(|_| "workers still hold the samples".to_owned())?
        .into_inner();
    samples.acquire.sort_unstable();
    samples.release.sort_unstable();
    let pairs = samples.release.len();
    let mode = args
        .rate
        .map_or_else(|| "closed".to_owned(), |rate| format!("paced:{rate}/s"));
    println!(
        "mode={mode} workers={} connections={} mb={} seconds={:.1} pairs={} pairs_per_second={:.0} \
         acquire_p50_ms={:.2} acquire_p99_ms={:.2} acquire_max_ms={:.2} \
         release_p50_ms={:.2} release_p99_ms={:.2} failures={}",
        args.workers,
        channels.len(),
        args.mb,
        elapsed.as_secs_f64(),
        pairs,
        pairs as f64 / elapsed.as_secs_f64(),
        percentile_ms(&samples.acquire, 0.50),
        percentile_ms(&samples.acquire, 0.99),
        percentile_ms(&samples.acquire, 1.0),
        percentile_ms(&samples.release, 0.50),
        percentile_ms(&samples.release, 0.99),
        samples.failures.len(),
    );
    if let Some(first) = samples.failures.first() {
        return Err(format!(
            "{} calls failed; the first: {first}",
            samples.failures.len()
        ));
    }
    Ok(())
}

/// One acquire+release pair (or two health checks), timed from
/// `scheduled`.
async fn pair(
    calls: &mut Calls,
    request_id: String,
    mb: u64,
    token: Option<&str>,
    scheduled: Instant,
    samples: &mut Samples,
) {
    let client = match calls {
        Calls::Leases(client) => client,
        Calls::HealthChecks(health) => return health_checks(health, scheduled, samples).await,
    };
    let acquired = client
        .acquire_lease(request(
            acquire_request(request_id, mb, Duration::ZERO),
            token,
        ))
        .await;
    let lease = match acquired {
        Ok(lease) => lease.into_inner(),
        Err(status) => {
            samples.failures.push(format!("acquire: {status:?}"));
            return;
        }
    };
    samples.acquire.push(scheduled.elapsed());
    let begun = Instant::now();
    let released = client
        .release_lease(request(
            proto::ReleaseLeaseRequest {
                lease_id: lease.lease_id,
            },
            token,
        ))
        .await;
    match released {
        Ok(_) => samples.release.push(begun.elapsed()),
        Err(status) => samples.failures.push(format!("release: {status:?}")),
    }
}

/// Two health checks, each timed as an acquire; the pair from `scheduled`.
async fn health_checks(
    health: &mut HealthClient<Channel>,
    scheduled: Instant,
    samples: &mut Samples,
) {
    for _ in 0..2 {
        let begun = Instant::now();
        let checked = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        match checked {
            Ok(_) => samples.acquire.push(begun.elapsed()),
            Err(status) => samples.failures.push(format!("health: {status:?}")),
        }
    }
    samples.release.push(scheduled.elapsed());
}

/// `--workers` loops, each starting a pair as soon as its last one ends.
async fn closed_loops(
    args: &Args,
    channels: &[Channel],
    samples: &Arc<Mutex<Samples>>,
    until: Instant,
) -> Result<(), String> {
    let mut workers = Vec::new();
    for worker in 0..args.workers {
        let mut calls = Calls::new(
            channels[worker % channels.len()].clone(),
            args.health_checks,
        );
        let samples = samples.clone();
        let token = args.admin_token.clone();
        let mb = args.mb;
        workers.push(tokio::spawn(async move {
            let mut local = Samples::default();
            let mut sequence = 0u64;
            while Instant::now() < until {
                sequence += 1;
                let request_id = format!("load-{worker}-{sequence}");
                pair(
                    &mut calls,
                    request_id,
                    mb,
                    token.as_deref(),
                    Instant::now(),
                    &mut local,
                )
                .await;
            }
            samples.lock().await.absorb(local);
        }));
    }
    for worker in workers {
        worker.await.map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Pairs started `rate` times a second on a fixed schedule, at most
/// `--workers` in flight; each is timed from its place in the schedule.
async fn paced(
    args: &Args,
    rate: u32,
    channels: &[Channel],
    samples: &Arc<Mutex<Samples>>,
    until: Instant,
) -> Result<(), String> {
    if rate == 0 {
        return Err("--rate must be at least 1".to_owned());
    }
    let in_flight = Arc::new(Semaphore::new(args.workers.max(1)));
    let period = Duration::from_secs(1) / rate;
    let first = Instant::now();
    let mut pairs = Vec::new();
    for sequence in 0u32.. {
        let scheduled = first + period * sequence;
        if scheduled >= until {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|error| error.to_string())?;
        let mut calls = Calls::new(
            channels[sequence as usize % channels.len()].clone(),
            args.health_checks,
        );
        let token = args.admin_token.clone();
        let mb = args.mb;
        pairs.push(tokio::spawn(async move {
            let mut local = Samples::default();
            let request_id = format!("paced-{sequence}");
            pair(
                &mut calls,
                request_id,
                mb,
                token.as_deref(),
                scheduled,
                &mut local,
            )
            .await;
            drop(permit);
            local
        }));
    }
    let mut all = samples.lock().await;
    for pair in pairs {
        all.absorb(pair.await.map_err(|error| error.to_string())?);
    }
    Ok(())
}

impl Samples {
    fn absorb(&mut self, other: Self) {
        self.acquire.extend(other.acquire);
        self.release.extend(other.release);
        self.failures.extend(other.failures);
    }
}

fn percentile_ms(sorted: &[Duration], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}
