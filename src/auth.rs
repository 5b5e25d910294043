//! Credentials: the cluster's join token, the operators' admin token, and
//! each node's own secret.
//!
//! Invariants:
//! - A token or secret is never logged or printed: their `Debug` shows only
//!   that a value is there.
//! - Presented credentials are compared in constant time, as SHA-256 digests,
//!   so neither their content nor their length leaks through timing.
//! - The coordinator keeps only the digest of a node secret.

use std::{fmt, io, path::Path};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::validation::InvalidInput;

/// Metadata carrying the join token on Heartbeat streams and Status probes.
pub const JOIN_TOKEN_METADATA: &str = "x-muster-join-token";
/// Metadata carrying the admin token, as `Bearer <token>`.
pub const AUTHORIZATION_METADATA: &str = "authorization";

/// Shortest token or node secret accepted: anything shorter is guessable.
pub const MIN_CREDENTIAL_LEN: usize = 16;
/// Longest token or node secret accepted.
pub const MAX_CREDENTIAL_LEN: usize = 256;

/// Checks the shape every token and node secret must have: printable ASCII
/// without spaces (it travels as gRPC metadata), of a sensible length.
fn check_credential(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    let len = value.len();
    if !(MIN_CREDENTIAL_LEN..=MAX_CREDENTIAL_LEN).contains(&len) {
        return Err(InvalidInput::new(
            field,
            format!("must be {MIN_CREDENTIAL_LEN} to {MAX_CREDENTIAL_LEN} bytes, got {len}"),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidInput::new(
            field,
            "may contain only printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

/// A shared token (join or admin), held as its digest.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
    /// Kept for the clients that must present it.
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    pub fn new(field: &'static str, value: &str) -> Result<Self, InvalidInput> {
        check_credential(field, value)?;
        let value = MetadataValue::try_from(value)
            .map_err(|_| InvalidInput::new(field, "is not valid gRPC metadata"))?;
        Ok(Self {
            digest: digest(value.as_bytes()),
            value,
        })
    }

    /// Reads a token from a file, ignoring surrounding whitespace.
    pub fn from_file(field: &'static str, path: &Path) -> Result<Self, TokenFileError> {
        let contents = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            field,
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::new(field, contents.trim())?)
    }

    /// Reads the token a flag names, when the flag is set.
    pub fn from_optional_file(
        field: &'static str,
        path: Option<&Path>,
    ) -> Result<Option<Self>, TokenFileError> {
        path.map(|path| Self::from_file(field, path)).transpose()
    }

    fn matches(&self, presented: &[u8]) -> bool {
        self.digest.ct_eq(&digest(presented)).into()
    }

    /// Whether `presented` is this token, compared in constant time.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.matches(presented)
    }

    /// The value of the dashboard's session cookie for this token: a digest
    /// that proves the token was presented at login without being it, the
    /// same across coordinator restarts, and changed by changing the token.
    pub fn session_value(&self) -> String {
        hex::encode(self.session_digest())
    }

    /// Whether `presented` is this token's session value, compared in
    /// constant time.
    pub fn accepts_session(&self, presented: &[u8]) -> bool {
        let mut decoded = [0u8; 32];
        if hex::decode_to_slice(presented, &mut decoded).is_err() {
            return false;
        }
        self.session_digest().ct_eq(&decoded).into()
    }

    fn session_digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(SESSION_CONTEXT);
        hasher.update(self.digest);
        hasher.finalize().into()
    }

    /// Adds this token to outgoing request metadata as the join token.
    pub fn attach_as_join(&self, metadata: &mut MetadataMap) {
        metadata.insert(JOIN_TOKEN_METADATA, self.value.clone());
    }

    /// Adds this token to outgoing request metadata as a bearer token.
    pub fn attach_as_bearer(&self, metadata: &mut MetadataMap) {
        let bearer = format!("Bearer {}", self.value.to_str().unwrap_or_default());
        if let Ok(value) = MetadataValue::try_from(bearer) {
            metadata.insert(AUTHORIZATION_METADATA, value);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read {field} {path}")]
    Read {
        field: &'static str,
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
}

/// Why a request's credentials were not accepted. The messages say what is
/// missing, never what was presented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing {0} metadata: this server requires a token")]
    Missing(&'static str),
    #[error("the {0} metadata does not hold the right token")]
    Wrong(&'static str),
}

/// Checks the join token a caller `presented` (the value of its
/// [`JOIN_TOKEN_METADATA`]), when one is required.
pub fn require_join_token(
    required: Option<&Token>,
    presented: Option<&[u8]>,
) -> Result<(), Denied> {
    let Some(token) = required else {
        return Ok(());
    };
    let presented = presented.ok_or(Denied::Missing(JOIN_TOKEN_METADATA))?;
    if token.matches(presented) {
        Ok(())
    } else {
        Err(Denied::Wrong(JOIN_TOKEN_METADATA))
    }
}

/// Checks that a caller's `authorization` value is `Bearer <admin token>`
/// (the scheme in any case), when an admin token is required.
pub fn require_admin_token(
    required: Option<&Token>,
    authorization: Option<&[u8]>,
) -> Result<(), Denied> {
    let Some(token) = required else {
        return Ok(());
    };
    let authorization = authorization.ok_or(Denied::Missing(AUTHORIZATION_METADATA))?;
    let bearer = authorization
        .split_at_checked(BEARER.len())
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(BEARER))
        .map(|(_, presented)| presented)
        .ok_or(Denied::Wrong(AUTHORIZATION_METADATA))?;
    if token.matches(bearer) {
        Ok(())
    } else {
        Err(Denied::Wrong(AUTHORIZATION_METADATA))
    }
}

const BEARER: &[u8] = b"Bearer ";
/// Keeps a session value from equalling any other digest of the token.
const SESSION_CONTEXT: &[u8] = b"muster dashboard session v1\0";

/// A node's secret: created once by its agent, kept beside the node id, and
/// presented at every registration. It binds the node id to that machine.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeSecret(String);

impl fmt::Debug for NodeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeSecret(<redacted>)")
    }
}

impl NodeSecret {
    /// 32 random bytes, hex-encoded.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InvalidInput> {
        check_credential(field, raw)?;
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the coordinator stores in place of the secret.
    pub fn hash(&self) -> SecretHash {
        SecretHash(digest(self.0.as_bytes()))
    }
}

/// The SHA-256 digest of a node secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash([u8; 32]);

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

impl SecretHash {
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// Parses what [`SecretHash::to_hex`] wrote; `None` if it is not that.
    pub fn from_hex(encoded: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(encoded, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// Constant-time equality.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    #[test]
    fn tokens_are_bounded_and_printable() {
        assert!(Token::new("join token", TOKEN).is_ok());
        for bad in [
            "short",
            &"x".repeat(MAX_CREDENTIAL_LEN + 1),
            "has a space in it ok",
        ] {
            assert_eq!(
                Token::new("join token", bad).unwrap_err().field,
                "join token"
            );
        }
    }

    #[test]
    fn join_token_is_checked() {
        let token = Token::new("t", TOKEN).unwrap();
        assert_eq!(
            require_join_token(Some(&token), None),
            Err(Denied::Missing(JOIN_TOKEN_METADATA))
        );
        assert_eq!(require_join_token(None, None), Ok(()));
        assert_eq!(
            require_join_token(Some(&token), Some(b"0123456789abcdef-other")),
            Err(Denied::Wrong(JOIN_TOKEN_METADATA))
        );
        let mut metadata = MetadataMap::new();
        token.attach_as_join(&mut metadata);
        let presented = metadata.get(JOIN_TOKEN_METADATA).map(|v| v.as_bytes());
        assert_eq!(require_join_token(Some(&token), presented), Ok(()));
    }

    #[test]
    fn admin_token_is_a_bearer_token() {
        let token = Token::new("t", TOKEN).unwrap();
        assert_eq!(
            require_admin_token(Some(&token), Some(TOKEN.as_bytes())),
            Err(Denied::Wrong(AUTHORIZATION_METADATA))
        );
        let lower = format!("bearer {TOKEN}");
        assert_eq!(
            require_admin_token(Some(&token), Some(lower.as_bytes())),
            Ok(())
        );
        let mut metadata = MetadataMap::new();
        token.attach_as_bearer(&mut metadata);
        let presented = metadata.get(AUTHORIZATION_METADATA).map(|v| v.as_bytes());
        assert_eq!(require_admin_token(Some(&token), presented), Ok(()));
    }

    #[test]
    fn session_values_prove_the_token_without_being_it() {
        let token = Token::new("t", TOKEN).unwrap();
        let session = token.session_value();
        assert!(!session.contains(TOKEN));
        assert!(token.accepts_session(session.as_bytes()));
        assert_eq!(session, Token::new("t", TOKEN).unwrap().session_value());
        let other = Token::new("t", "0123456789abcdef-other").unwrap();
        assert!(!other.accepts_session(session.as_bytes()));
        assert!(!token.accepts_session(b"not hex"));
        assert!(!token.accepts_session(TOKEN.as_bytes()));
        assert!(token.accepts(TOKEN.as_bytes()));
        assert!(!token.accepts(session.as_bytes()));
    }

    #[test]
    fn debug_output_never_shows_a_credential() {
        let token = Token::new("t", TOKEN).unwrap();
        let secret = NodeSecret::generate();
        let shown = format!("{token:?} {secret:?} {:?}", secret.hash());
        assert!(
            !shown.contains(TOKEN) && !shown.contains(secret.expose()),
            "{shown}"
        );
    }

    #[test]
    fn secrets_are_random_and_hashes_round_trip() {
        let first = NodeSecret::generate();
        assert_ne!(first, NodeSecret::generate());
        assert_eq!(first.expose().len(), 64);
        let hash = first.hash();
        let parsed = SecretHash::from_hex(&hash.to_hex()).unwrap();
        assert!(parsed.matches(&hash));
        assert!(!parsed.matches(&NodeSecret::generate().hash()));
        assert!(SecretHash::from_hex("zz").is_none());
    }
}
