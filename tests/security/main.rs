//! Security: node secrets bind node ids, join and admin tokens, mutual TLS,
//! hostile input and load shedding. Every case goes through a real gRPC
//! client against real coordinator and agent processes.

#[path = "../common/mod.rs"]
mod common;

mod caller;
mod hostile_input;
mod load_shedding;
mod mutual_tls;
mod node_secret;
mod pki;
mod steps;
mod tokens;

use std::time::Duration;

const JOIN_TOKEN: &str = "join-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
/// How long a refused agent is watched to make sure it never gets in.
const REFUSAL_WINDOW: Duration = Duration::from_secs(3);
