//! One Status service that answers for every simulated agent of a swarm.
//!
//! Each agent advertises its own loopback address on the listener's port;
//! the address a probe connected to (the connection's local address) says
//! which agent was dialled, and that agent answers as itself. A probe that
//! reaches no agent's address is refused with NOT_FOUND, which the
//! coordinator treats as nothing listening there, so its identity check is
//! exercised as it is against real agents.

use std::net::{IpAddr, Ipv4Addr};

use tonic::{Request, Response, Status};

use crate::{
    agent::Identity,
    error::ServiceError,
    proto::{StatusRequest, StatusResponse, agent_server::Agent},
};

pub struct SwarmStatus {
    /// The address of `identities[0]`; agent `i` listens at this plus `i`.
    first_address: u32,
    identities: Vec<Identity>,
}

impl SwarmStatus {
    pub fn new(first_address: Ipv4Addr, identities: Vec<Identity>) -> Self {
        Self {
            first_address: first_address.into(),
            identities,
        }
    }

    fn identity_at(&self, address: IpAddr) -> Option<&Identity> {
        let IpAddr::V4(address) = address else {
            return None;
        };
        let index = u32::from(address).checked_sub(self.first_address)?;
        self.identities.get(usize::try_from(index).ok()?)
    }
}

#[tonic::async_trait]
impl Agent for SwarmStatus {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let dialled = request.local_addr();
        match dialled.and_then(|address| self.identity_at(address.ip())) {
            Some(identity) => Ok(Response::new(identity.answer(&request)?)),
            None => Err(ServiceError::NoSimulatedAgent(
                dialled.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string()),
            )
            .into()),
        }
    }
}
