//! Micro-benchmark of the lease pool alone (no gRPC, no store): a fleet of
//! `--nodes` × `--gpus-per-node` GPUs, filled to `--fill` with long-lived
//! leases of random sizes, then `--pairs` acquire+release pairs of random
//! sizes. Prints pairs per second and the acquire latency percentiles.
//!
//! `cargo run --release --example pool_bench -- --nodes 10000 --gpus-per-node 8`

use std::{
    collections::BTreeMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use muster::{
    clock::Moment,
    node::{NodeId, NodeState},
    pool::{
        AcquireRequest, Acquisition, Constraints, GpuView, LabelSelector, LeaseTerms, NodeView,
        Pool, PoolConfig, PoolError,
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    #[arg(long, default_value_t = 81_920)]
    gpu_mib: u64,
    /// Fraction of the fleet's memory leased before the measurement.
    #[arg(long, default_value_t = 0.5)]
    fill: f64,
    #[arg(long, default_value_t = 100_000)]
    pairs: usize,
    /// Ask every measured lease for `zone=z<N>` out of 4 zones.
    #[arg(long)]
    label_selector: bool,
    /// Measure preemption instead: every measured request has priority 1,
    /// waits, and asks for 3/4 of a GPU, so it revokes fill leases.
    #[arg(long)]
    preempt: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pool_bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), PoolError> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut pool = Pool::new(PoolConfig::default());
    let now = Moment::now();
    for n in 0..args.nodes {
        let node_id = NodeId::parse("node_id", &format!("node-{n:05}"))?;
        let labels = BTreeMap::from([("zone".to_owned(), format!("z{}", n % 4))]);
        pool.upsert_node(
            NodeView {
                node_id: node_id.clone(),
                state: NodeState::Online,
                drained: false,
                labels,
            },
            now,
        );
        let gpus = (0..args.gpus_per_node)
            .map(|index| GpuView {
                index,
                uuid: format!("GPU-{n:05}-{index}"),
                total_mib: args.gpu_mib,
                used_mib: 0,
                healthy: true,
            })
            .collect();
        pool.set_gpus(&node_id, gpus)?;
    }
    let request = |id: String, mb: u64, labels: &LabelSelector| AcquireRequest {
        request_id: id,
        terms: LeaseTerms {
            holder: "bench".to_owned(),
            mb,
            priority: i32::from(args.preempt && mb > args.gpu_mib / 2),
            ttl: Duration::from_secs(3600),
            constraints: Constraints {
                labels: labels.clone(),
                ..Constraints::default()
            },
        },
        wait: if args.preempt {
            Duration::from_secs(30)
        } else {
            Duration::ZERO
        },
    };
    let fleet_mib = args.nodes as f64 * f64::from(args.gpus_per_node) * args.gpu_mib as f64;
    let mut filled = 0.0;
    let mut fill_count = 0u64;
    let started = Instant::now();
    while filled < fleet_mib * args.fill {
        let mb = rng.random_range(1_024..=args.gpu_mib / 2);
        let any = LabelSelector::default();
        match pool.acquire(&request(format!("fill-{fill_count}"), mb, &any), now) {
            Ok(_) => filled += mb as f64,
            Err(_) => break,
        }
        fill_count += 1;
    }
    eprintln!(
        "{} GPUs, {fill_count} leases filling {:.0} % in {:.1} s",
        args.nodes * args.gpus_per_node as usize,
        100.0 * filled / fleet_mib,
        started.elapsed().as_secs_f64()
    );

    let mut acquire_latencies = Vec::with_capacity(args.pairs);
    let mut refused = 0usize;
    let started = Instant::now();
    for i in 0..args.pairs {
        let labels = if args.label_selector {
            LabelSelector::parse("label_selector", &format!("zone=z{}", i % 4))?
        } else {
            LabelSelector::default()
        };
        let mb = if args.preempt {
            args.gpu_mib * 3 / 4
        } else {
            rng.random_range(1_024..=args.gpu_mib / 4)
        };
        let now = Moment::now();
        let begun = Instant::now();
        let outcome = pool.acquire(&request(format!("pair-{i}"), mb, &labels), now);
        acquire_latencies.push(begun.elapsed());
        match outcome {
            Ok((Acquisition::Granted(lease), _)) => {
                pool.release(&lease.lease_id, now);
            }
            Ok((Acquisition::Waiting(wait), _)) => {
                // The victims' holders comply, the waiting lease is granted
                // and released, and the room is leased out again to low
                // priorities, so that every measured request preempts anew.
                for victim in &wait.waiting_for {
                    pool.release(victim, now);
                }
                let retry = request(format!("pair-{i}"), mb, &labels);
                if let Ok((Acquisition::Granted(lease), _)) = pool.acquire(&retry, now) {
                    pool.release(&lease.lease_id, now);
                }
                let any = LabelSelector::default();
                loop {
                    let mb = rng.random_range(1_024..=args.gpu_mib / 2);
                    let refill = request(format!("refill-{fill_count}"), mb, &any);
                    fill_count += 1;
                    if pool.acquire(&refill, now).is_err() {
                        break;
                    }
                }
            }
            _ => refused += 1,
        }
        if i % 1000 == 0 {
            pool.tick(now);
        }
    }
    let elapsed = started.elapsed();
    acquire_latencies.sort_unstable();
    let percentile = |p: f64| {
        let rank = ((acquire_latencies.len() as f64 * p).ceil() as usize).max(1) - 1;
        acquire_latencies[rank]
    };
    println!(
        "{} acquire+release pairs in {:.2} s: {:.0} pairs/s, {refused} refused; acquire p50 {:?}, p99 {:?}, max {:?}",
        args.pairs,
        elapsed.as_secs_f64(),
        args.pairs as f64 / elapsed.as_secs_f64(),
        percentile(0.50),
        percentile(0.99),
        acquire_latencies.last().copied().unwrap_or_default()
    );
    Ok(())
}
