//! The node as the domain sees it: a validated identity, what an agent tells
//! about itself when it registers, and the state the coordinator holds.
//!
//! Everything here is validated on the way in, so the registry and the store
//! never hold a node id or URL that breaks the documented rules.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, SystemTime},
};

use crate::{auth::NodeSecret, validation::InvalidInput};

pub mod gpu;

pub use gpu::{Gpu, GpuInventory};

pub const MAX_NODE_ID_LEN: usize = 63;
pub const MAX_AGENT_URL_LEN: usize = 2048;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_SHORT_FIELD_LEN: usize = 256;
/// The reconnect backoff ceiling assumed of an agent that does not declare
/// its own (agents older than the field, and rows written before it).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest backoff ceiling a node is allowed for after a coordinator
/// restart, whatever its agent declares: the most an agent accepts for
/// `--max-backoff`.
pub const MAX_MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A node id: 1-63 characters of `[a-z0-9._-]`, starting with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InvalidInput> {
        let invalid = |reason: String| InvalidInput::new(field, reason);
        if raw.is_empty() || raw.len() > MAX_NODE_ID_LEN {
            return Err(invalid(format!(
                "must be 1 to {MAX_NODE_ID_LEN} characters, got {}",
                raw.len()
            )));
        }
        let allowed =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
        if let Some(bad) = raw.chars().find(|c| !allowed(*c)) {
            return Err(invalid(format!(
                "may contain only [a-z0-9._-], found {bad:?}"
            )));
        }
        if !raw.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(invalid("must start with a letter or digit".to_owned()));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Turns a host name into a valid node id: lowercased, with every other
    /// character replaced by `-`, truncated to the maximum length.
    pub fn from_hostname(hostname: &str) -> Result<Self, InvalidInput> {
        let sanitized: String = hostname
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .skip_while(|c| !c.is_ascii_alphanumeric())
            .take(MAX_NODE_ID_LEN)
            .collect();
        Self::parse("hostname", &sanitized)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an agent declares about itself in `register`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub node_id: NodeId,
    pub agent_url: String,
    pub boot_id: String,
    pub version: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    /// The longest the agent waits between reconnect attempts, at most
    /// [`MAX_MAX_BACKOFF`]: after a coordinator restart the node is given
    /// this long, on top of the usual allowance, to come back.
    pub max_backoff: Duration,
    /// The node's GPUs: declared in `register`, replaced by every inventory
    /// a heartbeat carries since.
    pub gpus: GpuInventory,
}

/// A validated `register`: what the agent declares about its node, and the
/// secret that proves its claim to the node id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub registration: Registration,
    pub secret: NodeSecret,
}

/// Accepts an `http` or `https` URL with a host and an explicit port. The
/// port is required: muster's ports are not the scheme's defaults, so a URL
/// without one is almost always a mistake.
pub fn validate_url(field: &'static str, url: &str) -> Result<(), InvalidInput> {
    if url.len() > MAX_AGENT_URL_LEN {
        return Err(InvalidInput::new(
            field,
            format!(
                "must be at most {MAX_AGENT_URL_LEN} bytes, got {}",
                url.len()
            ),
        ));
    }
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e| InvalidInput::new(field, format!("is not a valid URL ({e}): {url:?}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(InvalidInput::new(
            field,
            format!("must be an http or https URL: {url:?}"),
        ));
    }
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| InvalidInput::new(field, format!("must name a host: {url:?}")))?;
    if authority.port_u16().is_none() {
        return Err(InvalidInput::new(
            field,
            format!("must name a port: {url:?}"),
        ));
    }
    Ok(())
}

/// A short free-text field (boot id, version, host name): at most
/// [`MAX_SHORT_FIELD_LEN`] bytes and no control characters.
pub fn validate_short_field(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    refuse_control_characters(field, value)?;
    if value.len() > MAX_SHORT_FIELD_LEN {
        return Err(InvalidInput::new(
            field,
            format!(
                "must be at most {MAX_SHORT_FIELD_LEN} bytes, got {}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// The backoff ceiling an agent declares, `None` when it declares none,
/// bounded by [`MAX_MAX_BACKOFF`].
pub fn bounded_max_backoff(declared: Option<Duration>) -> Duration {
    declared.unwrap_or(DEFAULT_MAX_BACKOFF).min(MAX_MAX_BACKOFF)
}

/// Text that reaches logs and terminals must not carry line breaks or
/// escape sequences.
fn refuse_control_characters(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(InvalidInput::new(
            field,
            format!("must not contain control characters, found {c:?}"),
        )),
        None => Ok(()),
    }
}

pub fn validate_labels(
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, InvalidInput> {
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    if labels.len() > MAX_LABELS {
        return Err(InvalidInput::new(
            "register.labels",
            format!(
                "at most {MAX_LABELS} labels are allowed, got {}",
                labels.len()
            ),
        ));
    }
    for (key, value) in &labels {
        refuse_control_characters("register.labels", key)?;
        refuse_control_characters("register.labels", value)?;
        if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
            return Err(InvalidInput::new(
                "register.labels",
                format!("key {key:?} must be 1 to {MAX_LABEL_KEY_LEN} bytes"),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_LEN {
            return Err(InvalidInput::new(
                "register.labels",
                format!(
                    "value of {key:?} must be at most {MAX_LABEL_VALUE_LEN} bytes, got {}",
                    value.len()
                ),
            ));
        }
    }
    Ok(labels)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Loaded from the store after a restart and not yet proven alive.
    Unknown,
    Online,
    Offline,
    /// Its agent shut down on purpose and said so; expires like OFFLINE.
    Left,
}

/// An operator took the node out of service: it stays a member, but
/// anything that places work skips it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drain {
    pub reason: String,
    /// When the node was first drained; draining it again keeps this.
    pub since: SystemTime,
}

pub const MAX_DRAIN_REASON_LEN: usize = 256;

/// A drain reason, or a leave's: 1 to [`MAX_DRAIN_REASON_LEN`] bytes with no
/// control characters, as it reaches logs and terminals.
pub fn validate_reason(field: &'static str, reason: &str) -> Result<(), InvalidInput> {
    if reason.trim().is_empty() {
        return Err(InvalidInput::new(
            field,
            "must say why, in 1 to 256 bytes; got nothing",
        ));
    }
    refuse_control_characters(field, reason)?;
    if reason.len() > MAX_DRAIN_REASON_LEN {
        return Err(InvalidInput::new(
            field,
            format!(
                "must be at most {MAX_DRAIN_REASON_LEN} bytes, got {}",
                reason.len()
            ),
        ));
    }
    Ok(())
}

/// A node as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNode {
    pub registration: Registration,
    pub registered_at: SystemTime,
    pub last_seen: SystemTime,
    pub generation: u64,
    pub offline_since: Option<SystemTime>,
    pub drain: Option<Drain>,
    /// Set when the agent left on purpose: the node reloads LEFT.
    pub left_at: Option<SystemTime>,
}

/// A node as the registry shows it to readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub registration: Registration,
    pub state: NodeState,
    pub registered_at: SystemTime,
    pub last_seen: SystemTime,
    pub generation: u64,
    pub offline_since: Option<SystemTime>,
    pub drain: Option<Drain>,
    pub last_probe_error: Option<String>,
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_rules() {
        for good in ["a", "gpu-01", "0.node_x", &"a".repeat(63)] {
            assert!(
                NodeId::parse("node_id", good).is_ok(),
                "{good} should be accepted"
            );
        }
        for bad in ["", "-a", ".a", "A", "gpu 1", "gpü", &"a".repeat(64)] {
            let err = NodeId::parse("node_id", bad).expect_err(bad);
            assert_eq!(err.field, "node_id");
        }
    }

    #[test]
    fn reason_rules() {
        assert!(validate_reason("reason", "replacing a fan").is_ok());
        for bad in ["", "  ", "a\nb", "\u{1b}[31m", &"a".repeat(257)] {
            assert!(validate_reason("reason", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostname_becomes_node_id() {
        assert_eq!(
            NodeId::from_hostname("GPU_Box 7.local").unwrap().as_str(),
            "gpu_box-7.local"
        );
        assert_eq!(NodeId::from_hostname("--x").unwrap().as_str(), "x");
        assert!(NodeId::from_hostname("---").is_err());
    }
}
