//! Load test of the Pool service through gRPC: `--workers` concurrent
//! loops, each acquiring a lease and releasing it again, for `--duration`,
//! against a running coordinator whose fleet has GPUs (`muster swarm
//! --gpus-per-agent 8`). Every acquisition waits for its commit, as a real
//! client does. Prints pairs per second and the acquire and release latency
//! percentiles, and fails if any call failed.
//!
//! `cargo run --release --example lease_load -- --coordinator http://127.0.0.1:7700 --workers 256 --duration 30s`

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use muster::proto::{self, pool_client::PoolClient};
use tokio::sync::Mutex;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// Acquire+release loops running at once.
    #[arg(long, default_value_t = 256)]
    workers: usize,
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
    let mut workers = Vec::new();
    for worker in 0..args.workers {
        let mut client = PoolClient::new(channels[worker % channels.len()].clone());
        let samples = samples.clone();
        let token = args.admin_token.clone();
        let mb = args.mb;
        workers.push(tokio::spawn(async move {
            let mut local = Samples::default();
            let mut sequence = 0u64;
            while Instant::now() < until {
                sequence += 1;
                let request_id = format!("load-{worker}-{sequence}");
                let begun = Instant::now();
                let acquired = client
                    .acquire_lease(request(
                        acquire_request(request_id, mb, Duration::ZERO),
                        token.as_deref(),
                    ))
                    .await;
                let lease = match acquired {
                    Ok(lease) => lease.into_inner(),
                    Err(status) => {
                        local.failures.push(format!("acquire: {status:?}"));
                        continue;
                    }
                };
                local.acquire.push(begun.elapsed());
                let begun = Instant::now();
                let released = client
                    .release_lease(request(
                        proto::ReleaseLeaseRequest {
                            lease_id: lease.lease_id,
                        },
                        token.as_deref(),
                    ))
                    .await;
                match released {
                    Ok(_) => local.release.push(begun.elapsed()),
                    Err(status) => local.failures.push(format!("release: {status:?}")),
                }
            }
            let mut samples = samples.lock().await;
            samples.acquire.extend(local.acquire);
            samples.release.extend(local.release);
            samples.failures.extend(local.failures);
        }));
    }
    for worker in workers {
        worker.await.map_err(|error| error.to_string())?;
    }
    let elapsed = started.elapsed();
    let mut samples = Arc::try_unwrap(samples)
        .map_err(|_| "workers still hold the samples".to_owned())?
        .into_inner();
    samples.acquire.sort_unstable();
    samples.release.sort_unstable();
    let pairs = samples.release.len();
    println!(
        "workers={} connections={} mb={} seconds={:.1} pairs={} pairs_per_second={:.0} \
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

fn percentile_ms(sorted: &[Duration], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}
