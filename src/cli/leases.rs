//! `muster leases list|acquire|renew|release`: the Pool service from the
//! command line, printed as a table for people or JSON for scripts.

use std::{
    io::{self, Write},
    time::SystemTime,
};

use super::{Access, Operators};
use crate::{
    config::{LeaseStateArg, LeasesCommand, OutputFormat},
    error::RunError,
    proto,
};

pub async fn run_leases(command: LeasesCommand, out: &mut impl Write) -> Result<(), RunError> {
    match command {
        LeasesCommand::List {
            node_id,
            gpu_uuid,
            holder,
            state,
            client,
        } => {
            let message = proto::ListLeasesRequest {
                node_id: node_id.unwrap_or_default(),
                gpu_uuid: gpu_uuid.unwrap_or_default(),
                holder: holder.unwrap_or_default(),
                states: state
                    .into_iter()
                    .map(|s| state_to_proto(s) as i32)
                    .collect(),
            };
            let listed = Operators::new(&client)?
                .call(Access::Read, |operator| {
                    let request = operator.request(message.clone());
                    async move { operator.pool().list_leases(request).await }
                })
                .await?;
            write_leases(out, client.output, &listed.leases)?;
        }
        LeasesCommand::Acquire {
            holder,
            mb,
            ttl,
            priority,
            wait,
            request_id,
            node_id,
            gpu_uuid,
            selector,
            client,
        } => {
            // One request id for every coordinator asked, so that a lease
            // granted once is not granted twice.
            let message = proto::AcquireLeaseRequest {
                request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                holder,
                mb,
                priority,
                ttl: prost_types::Duration::try_from(ttl).ok(),
                wait: wait.and_then(|wait| prost_types::Duration::try_from(wait).ok()),
                node_id: node_id.unwrap_or_default(),
                gpu_uuid: gpu_uuid.unwrap_or_default(),
                label_selector: selector,
            };
            let lease = Operators::new(&client)?
                .call(Access::Write, |operator| {
                    let mut request = operator.request(message.clone());
                    if let Some(wait) = wait {
                        request.set_timeout(wait + super::CONNECT_TIMEOUT);
                    }
                    async move { operator.pool().acquire_lease(request).await }
                })
                .await?;
            write_leases(out, client.output, std::slice::from_ref(&lease))?;
        }
        LeasesCommand::Renew { lease_id, client } => {
            let lease = Operators::new(&client)?
                .call(Access::Write, |operator| {
                    let request = operator.request(proto::RenewLeaseRequest {
                        lease_id: lease_id.clone(),
                    });
                    async move { operator.pool().renew_lease(request).await }
                })
                .await?;
            write_leases(out, client.output, std::slice::from_ref(&lease))?;
        }
        LeasesCommand::Release { lease_id, client } => {
            let released = Operators::new(&client)?
                .call(Access::Write, |operator| {
                    let request = operator.request(proto::ReleaseLeaseRequest {
                        lease_id: lease_id.clone(),
                    });
                    async move { operator.pool().release_lease(request).await }
                })
                .await?;
            let leases: Vec<proto::Lease> = released.lease.into_iter().collect();
            write_leases(out, client.output, &leases)?;
        }
    }
    Ok(())
}

fn state_to_proto(state: LeaseStateArg) -> proto::LeaseState {
    match state {
        LeaseStateArg::Active => proto::LeaseState::Active,
        LeaseStateArg::Revoked => proto::LeaseState::Revoked,
        LeaseStateArg::Suspended => proto::LeaseState::Suspended,
        LeaseStateArg::Released => proto::LeaseState::Released,
    }
}

fn state_name(raw: i32) -> &'static str {
    match proto::LeaseState::try_from(raw) {
        Ok(proto::LeaseState::Active) => "ACTIVE",
        Ok(proto::LeaseState::Revoked) => "REVOKED",
        Ok(proto::LeaseState::Suspended) => "SUSPENDED",
        Ok(proto::LeaseState::Released) => "RELEASED",
        Ok(proto::LeaseState::Unspecified) | Err(_) => "UNSPECIFIED",
    }
}

fn rfc3339(timestamp: Option<prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| SystemTime::try_from(t).ok())
        .map_or_else(
            || "-".to_owned(),
            |at| humantime::format_rfc3339_seconds(at).to_string(),
        )
}

fn lease_json(lease: &proto::Lease) -> serde_json::Value {
    serde_json::json!({
        "lease_id": lease.lease_id,
        "request_id": lease.request_id,
        "holder": lease.holder,
        "node_id": lease.node_id,
        "gpu_uuid": lease.gpu_uuid,
        "mb": lease.mb,
        "priority": lease.priority,
        "generation": lease.generation,
        "state": state_name(lease.state),
        "granted_at": rfc3339(lease.granted_at),
        "expires_at": rfc3339(lease.expires_at),
        "ttl_seconds": lease.ttl.map(|ttl| ttl.seconds),
        "release_reason": (!lease.release_reason.is_empty()).then_some(&lease.release_reason),
    })
}

pub fn write_leases(
    out: &mut impl Write,
    format: OutputFormat,
    leases: &[proto::Lease],
) -> io::Result<()> {
    match format {
        OutputFormat::Json => {
            let views: Vec<serde_json::Value> = leases.iter().map(lease_json).collect();
            serde_json::to_writer_pretty(&mut *out, &views)?;
            writeln!(out)
        }
        OutputFormat::Table => {
            let header = [
                "LEASE", "STATE", "HOLDER", "MB", "PRIO", "NODE", "GPU", "GEN", "EXPIRES",
            ]
            .map(str::to_owned);
            let rows: Vec<[String; 9]> = leases
                .iter()
                .map(|lease| {
                    [
                        lease.lease_id.clone(),
                        state_name(lease.state).to_owned(),
                        lease.holder.clone(),
                        lease.mb.to_string(),
                        lease.priority.to_string(),
                        lease.node_id.clone(),
                        lease.gpu_uuid.clone(),
                        lease.generation.to_string(),
                        rfc3339(lease.expires_at),
                    ]
                })
                .collect();
            let mut widths = header.clone().map(|h| h.len());
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            for row in std::iter::once(&header).chain(&rows) {
                let line: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect();
                writeln!(out, "{}", line.join("  ").trim_end())?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, state: proto::LeaseState) -> proto::Lease {
        proto::Lease {
            lease_id: id.to_owned(),
            holder: "trainer".to_owned(),
            node_id: "gpu-1".to_owned(),
            gpu_uuid: "GPU-1".to_owned(),
            mb: 4096,
            state: state.into(),
            generation: 7,
            ..proto::Lease::default()
        }
    }

    #[test]
    fn leases_print_as_an_aligned_table_or_as_json() {
        let leases = [
            lease("lease-7", proto::LeaseState::Active),
            lease("lease-12", proto::LeaseState::Revoked),
        ];
        let mut table = Vec::new();
        write_leases(&mut table, OutputFormat::Table, &leases).unwrap();
        let table = String::from_utf8(table).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("LEASE     STATE"), "{table}");
        assert!(
            lines[2].contains("REVOKED") && lines[2].contains("4096"),
            "{table}"
        );

        let mut json = Vec::new();
        write_leases(&mut json, OutputFormat::Json, &leases).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed[1]["state"], "REVOKED");
        assert_eq!(parsed[0]["generation"], 7);
        assert!(parsed[0]["release_reason"].is_null());
    }
}
