//! The node as the domain sees it: a validated identity, what an agent tells
//! about itself when it registers, and the state the coordinator holds.
//!
//! Everything here is validated on the way in, so the registry and the store
//! never hold a node id or URL that breaks the documented rules.

use std::{collections::BTreeMap, fmt, time::SystemTime};

use crate::{auth::NodeSecret, error::InvalidInput, proto};

pub const MAX_NODE_ID_LEN: usize = 63;
pub const MAX_AGENT_URL_LEN: usize = 2048;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_SHORT_FIELD_LEN: usize = 256;

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
}

/// A validated `register`: what the agent declares about its node, and the
/// secret that proves its claim to the node id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub registration: Registration,
    pub secret: NodeSecret,
}

impl TryFrom<proto::Register> for Claim {
    type Error = InvalidInput;

    fn try_from(register: proto::Register) -> Result<Self, Self::Error> {
        let node_id = NodeId::parse("register.node_id", &register.node_id)?;
        let secret = NodeSecret::parse("register.node_secret", &register.node_secret)?;
        validate_url("register.agent_url", &register.agent_url)?;
        if register.boot_id.is_empty() {
            return Err(InvalidInput::new("register.boot_id", "must not be empty"));
        }
        for (field, value) in [
            ("register.boot_id", &register.boot_id),
            ("register.version", &register.version),
            ("register.hostname", &register.hostname),
        ] {
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
        }
        let labels = validate_labels(register.labels)?;
        Ok(Self {
            registration: Registration {
                node_id,
                agent_url: register.agent_url,
                boot_id: register.boot_id,
                version: register.version,
                hostname: register.hostname,
                labels,
            },
            secret,
        })
    }
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

fn validate_labels(
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
}

impl From<NodeState> for proto::NodeState {
    fn from(state: NodeState) -> Self {
        match state {
            NodeState::Unknown => Self::Unknown,
            NodeState::Online => Self::Online,
            NodeState::Offline => Self::Offline,
        }
    }
}

/// A node as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNode {
    pub registration: Registration,
    pub registered_at: SystemTime,
    pub last_seen: SystemTime,
    pub generation: u64,
    pub offline_since: Option<SystemTime>,
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
    pub last_probe_error: Option<String>,
}

impl From<NodeSnapshot> for proto::Node {
    fn from(node: NodeSnapshot) -> Self {
        let registration = node.registration;
        Self {
            node_id: registration.node_id.to_string(),
            agent_url: registration.agent_url,
            state: proto::NodeState::from(node.state).into(),
            last_seen: Some(node.last_seen.into()),
            registered_at: Some(node.registered_at.into()),
            boot_id: registration.boot_id,
            labels: registration.labels.into_iter().collect(),
            version: registration.version,
            hostname: registration.hostname,
            session_generation: node.generation,
            offline_since: node.offline_since.map(Into::into),
            last_probe_error: node.last_probe_error.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(node_id: &str, agent_url: &str) -> proto::Register {
        proto::Register {
            node_id: node_id.to_owned(),
            agent_url: agent_url.to_owned(),
            boot_id: "boot".to_owned(),
            node_secret: "0123456789abcdef".to_owned(),
            ..Default::default()
        }
    }

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
    fn hostname_becomes_node_id() {
        assert_eq!(
            NodeId::from_hostname("GPU_Box 7.local").unwrap().as_str(),
            "gpu_box-7.local"
        );
        assert_eq!(NodeId::from_hostname("--x").unwrap().as_str(), "x");
        assert!(NodeId::from_hostname("---").is_err());
    }

    #[test]
    fn agent_url_rules() {
        assert!(Claim::try_from(register("n", "http://10.0.0.1:7701")).is_ok());
        assert!(Claim::try_from(register("n", "https://gpu.example:443")).is_ok());
        for bad in [
            "",
            "10.0.0.1:7701",
            "ftp://h:1",
            "http://h",
            "http://:80",
            "http://h:notaport",
        ] {
            let err = Claim::try_from(register("n", bad)).expect_err(bad);
            assert_eq!(err.field, "register.agent_url", "{bad}");
        }
        let long = format!("http://h:1/{}", "x".repeat(MAX_AGENT_URL_LEN));
        assert!(Claim::try_from(register("n", &long)).is_err());
    }

    #[test]
    fn label_bounds() {
        let mut too_many = register("n", "http://h:1");
        too_many.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(Claim::try_from(too_many).is_err());

        let mut long_value = register("n", "http://h:1");
        long_value
            .labels
            .insert("gpu".into(), "x".repeat(MAX_LABEL_VALUE_LEN + 1));
        assert!(Claim::try_from(long_value).is_err());
    }

    #[test]
    fn node_secret_is_required_and_bounded() {
        for bad in ["", "short", &"s".repeat(257), "with spaces inside it"] {
            let mut message = register("n", "http://h:1");
            message.node_secret = bad.to_owned();
            assert_eq!(
                Claim::try_from(message).unwrap_err().field,
                "register.node_secret"
            );
        }
    }

    #[test]
    fn control_characters_are_refused() {
        let mut message = register("n", "http://h:1");
        message.hostname = "gpu\n2026-01-01 INFO forged".into();
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.hostname"
        );
        let mut message = register("n", "http://h:1");
        message.labels.insert("gpu".into(), "\u{1b}[31mred".into());
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.labels"
        );
    }

    #[test]
    fn empty_boot_id_is_refused() {
        let mut message = register("n", "http://h:1");
        message.boot_id.clear();
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.boot_id"
        );
    }
}
