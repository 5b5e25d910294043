//! muster: a control plane that keeps a fleet of agent nodes registered with a
//! coordinator through restarts of either side.
//!
//! - [`registry`] is the node state machine: pure, driven by time passed in.
//! - [`store`] owns the database; nothing else touches diesel.
//! - [`coordinator`] wires the gRPC service, heartbeat sessions, prober,
//!   sweeper and store writer together.
//! - [`agent`] is the daemon on each node: identity, Status service and the
//!   reconnecting heartbeat link.
//! - [`dashboard`] is the coordinator's HTTP listener: the live web page,
//!   its JSON and event stream, and `/metrics`.
//! - [`cli`] holds the operator commands.
//! - [`pool`] is the VRAM lease pool: pure, driven by time passed in.
//! - [`swarm`] simulates a fleet of agents from one process, for benchmarks.
//! - [`events`] is the fleet's event feed: pure, fed by the store after
//!   each commit, read by `WatchNodes`.
//! - [`failover`] is the list of coordinators a client dials, and which
//!   one it tries next (following a standby's leader hint).
//! - [`wire`] converts between the wire types of [`proto`] and the domain.
//!
//! Modules depend one way, from the top down, and the graph has no cycle
//! (each module lists only what it imports; `clock`, `codec`, `limits`,
//! `proto` and `validation` import nothing of ours):
//!
//! ```text
//! swarm       -> agent auth config error failover grpc limits node proto
//! agent       -> auth config error failover grpc node proto tls
//! cli         -> auth config error failover grpc node proto tls wire
//! coordinator -> auth clock config dashboard error events grpc limits node pool proto registry store telemetry tls wire
//! dashboard   -> auth error grpc proto telemetry wire
//! telemetry   -> error grpc
//! shutdown    -> error
//! grpc        -> error proto tls
//! config      -> auth error tls
//! tls         -> error
//! failover    -> error node
//! error       -> auth node pool store validation
//! store       -> auth clock events node pool proto registry wire
//! events      -> proto
//! wire        -> auth node proto validation
//! registry    -> clock node
//! pool        -> clock node validation
//! node        -> auth validation
//! auth        -> validation
//! ```

pub mod agent;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod connections;
pub mod coordinator;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod failover;
pub mod grpc;
pub mod limits;
pub mod memory;
pub mod node;
pub mod pool;
pub mod proto;
pub mod registry;
pub mod shutdown;
pub mod store;
pub mod swarm;
pub mod telemetry;
pub mod tls;
pub mod validation;
pub mod wire;
