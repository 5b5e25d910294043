//! TLS for every channel, through tonic's rustls support.
//!
//! One set of flags serves each process, both as a server and as a client:
//! - `--tls-cert` / `--tls-key`: the certificate this process presents, to
//!   its clients when serving and to servers that ask for a client
//!   certificate when dialling. It needs both the serverAuth and clientAuth
//!   usages where it plays both roles (or no extended key usage at all).
//! - `--tls-ca`: the CA that signed the peers' certificates. A server given a
//!   CA requires and verifies client certificates (mutual TLS); a client
//!   verifies the server against it.
//!
//! Invariant: once a process has TLS flags, no gRPC channel it dials or
//! serves is plaintext; a mismatched URL is refused with a message saying
//! why. (The optional metrics endpoint is plain HTTP; see SECURITY.md.)
//!
//! Certificates are checked as they are loaded ([`check`]), and
//! `muster tls` makes them ([`issue`]).

pub mod check;
pub mod issue;

use std::path::{Path, PathBuf};

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::RunError;

/// Time a client allows a server's TLS handshake.
const CLIENT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents; needs --tls-key.
    // The pair is checked by `Tls::load`, not by clap's `requires`, which
    // does not count a value from the --config file.
    #[arg(long = "tls-cert", env = "MUSTER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "MUSTER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate that signed the peers' certificates. A server given
    /// one requires client certificates signed by it.
    #[arg(long = "tls-ca", env = "MUSTER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// Loaded TLS material.
#[derive(Clone)]
pub struct Tls {
    identity: Option<Identity>,
    /// Where the identity's certificate came from, and what it may be used
    /// for.
    own: Option<(PathBuf, check::Usages)>,
    ca: Option<Certificate>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

impl Tls {
    /// Reads the files the flags name; `None` when no TLS flag is set.
    pub fn load(args: &TlsArgs) -> Result<Option<Self>, RunError> {
        let (identity, own) = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read_pem("--tls-cert", cert, "CERTIFICATE")?;
                let usages = check::own_certificate("--tls-cert", cert, &cert_pem)?;
                let key_pem = read_pem("--tls-key", key, "PRIVATE KEY")?;
                (
                    Some(Identity::from_pem(cert_pem, key_pem)),
                    Some((cert.clone(), usages)),
                )
            }
            (None, None) => (None, None),
            (Some(_), None) | (None, Some(_)) => {
                return Err(RunError::Tls {
                    reason: "--tls-cert and --tls-key must be given together".to_owned(),
                });
            }
        };
        let ca = args
            .tls_ca
            .as_deref()
            .map(|ca| {
                let pem = read_pem("--tls-ca", ca, "CERTIFICATE")?;
                check::ca_certificates("--tls-ca", ca, &pem)?;
                Ok::<_, RunError>(Certificate::from_pem(pem))
            })
            .transpose()?;
        Ok((identity.is_some() || ca.is_some()).then_some(Self { identity, own, ca }))
    }

    /// Whether this process has a certificate of its own to present.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The server side: this process's certificate, and client certificates
    /// required when a CA is given. A peer that stalls mid-handshake for
    /// `handshake_timeout` is dropped, so it cannot hold a connection slot.
    pub fn server_config(
        &self,
        handshake_timeout: std::time::Duration,
    ) -> Result<ServerTlsConfig, RunError> {
        let identity = self.identity.clone().ok_or_else(|| RunError::Tls {
            reason: "--tls-ca was given without --tls-cert and --tls-key; a TLS server needs a certificate".to_owned(),
        })?;
        self.require_usage(
            |usages| usages.server_auth,
            "serverAuth",
            "serve TLS",
            "--server",
        )?;
        let config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(handshake_timeout);
        Ok(match &self.ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        })
    }

    /// The client side: verify servers against the CA, and present this
    /// process's certificate to servers that ask for one.
    pub fn client_config(&self, url: &str) -> Result<ClientTlsConfig, RunError> {
        let ca = self.ca.clone().ok_or_else(|| RunError::Tls {
            reason: format!("{url} uses https: give --tls-ca, the CA that signed its certificate"),
        })?;
        let config = ClientTlsConfig::new()
            .ca_certificate(ca)
            .timeout(CLIENT_HANDSHAKE_TIMEOUT);
        Ok(match &self.identity {
            Some(identity) => {
                self.require_usage(
                    |usages| usages.client_auth,
                    "clientAuth",
                    "present it to a server",
                    "--client",
                )?;
                config.identity(identity.clone())
            }
            None => config,
        })
    }

    fn require_usage(
        &self,
        allows: impl Fn(check::Usages) -> bool,
        usage: &str,
        role: &str,
        cert_flag: &str,
    ) -> Result<(), RunError> {
        match &self.own {
            Some((path, usages)) if !allows(*usages) => Err(RunError::TlsCertificate {
                flag: "--tls-cert",
                path: path.clone(),
                problem: format!(
                    "certificate lacks the {usage} extended key usage, which it needs to {role} (make one with `muster tls cert {cert_flag}`, or without --client and --server for both)"
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Reads a PEM file and checks that it holds a block of the expected kind,
/// so a swapped or empty file is reported by name rather than as a handshake
/// failure later.
fn read_pem(flag: &'static str, path: &Path, kind: &str) -> Result<Vec<u8>, RunError> {
    let pem = std::fs::read(path).map_err(|source| RunError::TlsFile {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&pem);
    let holds_kind = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(kind));
    if !holds_kind {
        return Err(RunError::Tls {
            reason: format!("{flag} {} holds no PEM {kind} block", path.display()),
        });
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> TlsArgs {
        TlsArgs {
            tls_cert: cert.map(Path::to_owned),
            tls_key: key.map(Path::to_owned),
            tls_ca: ca.map(Path::to_owned),
        }
    }

    #[test]
    fn no_flags_means_no_tls() {
        assert!(Tls::load(&TlsArgs::default()).unwrap().is_none());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = Tls::load(&args(None, None, Some(&missing))).unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");

        let key_as_ca = dir.path().join("key.pem");
        std::fs::write(&key_as_ca, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let err = Tls::load(&args(None, None, Some(&key_as_ca))).unwrap_err();
        assert!(err.to_string().contains("no PEM CERTIFICATE"), "{err}");

        let err = Tls::load(&args(Some(&key_as_ca), None, None)).unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
    }

    #[test]
    fn a_ca_alone_cannot_serve_and_https_needs_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let certificate = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
        std::fs::write(&ca, certificate.cert.pem()).unwrap();
        let tls = Tls::load(&args(None, None, Some(&ca))).unwrap().unwrap();
        assert!(
            tls.server_config(crate::connections::HANDSHAKE_TIMEOUT)
                .is_err()
        );
        assert!(tls.client_config("https://h:1").is_ok());
        let no_ca = Tls {
            identity: None,
            own: None,
            ca: None,
        };
        let err = no_ca.client_config("https://h:1").unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
    }
}
