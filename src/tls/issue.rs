//! Making a cluster's CA and its certificates (`muster tls ca`, `muster tls
//! cert`), so TLS needs no PKI tooling: X.509 v3, ECDSA P-256 keys, the key
//! usages rustls checks, and subjectAltNames for every host name and IP.
//!
//! Invariant: an existing file is never replaced without `--force`, and a
//! private key is never readable by anyone but its owner, not even for the
//! moment between creating the file and writing it.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use crate::{
    config::{TlsCaConfig, TlsCertConfig},
    error::RunError,
};

/// Backdating of `notBefore`, so a peer whose clock runs a little behind
/// still accepts a certificate made a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

const PRIVATE_KEY_MODE: u32 = 0o600;
const CERTIFICATE_MODE: u32 = 0o644;

/// Files written by a command, to tell the user.
pub struct Written {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// Writes a new self-signed CA.
pub fn make_ca(config: &TlsCaConfig) -> Result<Written, RunError> {
    let written = Written {
        certificate: config.dir.join("ca.crt"),
        key: config.dir.join("ca.key"),
    };
    refuse_existing(&written, config.force)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, config.common_name.as_str());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, config.valid_for)?;
    let key = KeyPair::generate().map_err(certificate_error)?;
    let certificate = params.self_signed(&key).map_err(certificate_error)?;
    write_pair(
        &written,
        &certificate.pem(),
        &key.serialize_pem(),
        config.force,
    )?;
    Ok(written)
}

/// Writes a certificate for `config.names`, signed by the CA in
/// `config.ca` / `config.ca_key`.
pub fn make_cert(config: &TlsCertConfig) -> Result<Written, RunError> {
    let first = config.names.first().ok_or_else(|| RunError::TlsIssue {
        reason: "--name needs at least one host name or IP address".to_owned(),
    })?;
    let file_stem = config.file_name.clone().unwrap_or_else(|| first.clone());
    let written = Written {
        certificate: config.dir.join(format!("{file_stem}.crt")),
        key: config.dir.join(format!("{file_stem}.key")),
    };
    refuse_existing(&written, config.force)?;

    let ca_cert = config.ca_cert();
    let ca_key = config.ca_key();
    let ca_pem = read_text("--ca", &ca_cert)?;
    let ca_key_pem = read_text("--ca-key", &ca_key)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| RunError::TlsIssue {
        reason: format!(
            "--ca-key {}: not a usable private key ({e})",
            ca_key.display()
        ),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| RunError::TlsIssue {
        reason: format!(
            "--ca {}: not a usable CA certificate ({e})",
            ca_cert.display()
        ),
    })?;

    let mut params =
        CertificateParams::new(config.names.clone()).map_err(|e| RunError::TlsIssue {
            reason: format!(
                "--name {}: not a host name or IP address ({e})",
                config.names.join(",")
            ),
        })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, first.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let (server, client) = match (config.server, config.client) {
        (false, false) => (true, true),
        roles => roles,
    };
    if server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    set_validity(&mut params, config.valid_for)?;
    let key = KeyPair::generate().map_err(certificate_error)?;
    let certificate = params.signed_by(&key, &issuer).map_err(certificate_error)?;
    write_pair(
        &written,
        &certificate.pem(),
        &key.serialize_pem(),
        config.force,
    )?;
    Ok(written)
}

fn set_validity(params: &mut CertificateParams, valid_for: Duration) -> Result<(), RunError> {
    let now = OffsetDateTime::now_utc();
    let out_of_range = || RunError::TlsIssue {
        reason: format!(
            "--valid-for {} is out of range",
            humantime::format_duration(valid_for)
        ),
    };
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now
        .checked_add(valid_for.try_into().map_err(|_| out_of_range())?)
        .ok_or_else(out_of_range)?;
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    // A positive serial number with no leading zero byte, as RFC 5280 asks.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

fn refuse_existing(written: &Written, force: bool) -> Result<(), RunError> {
    if force {
        return Ok(());
    }
    for path in [&written.certificate, &written.key] {
        if path.exists() {
            return Err(RunError::TlsIssue {
                reason: format!(
                    "{} already exists; pass --force to replace it",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

fn write_pair(
    written: &Written,
    certificate: &str,
    key: &str,
    force: bool,
) -> Result<(), RunError> {
    write_file(&written.key, key, PRIVATE_KEY_MODE, force)?;
    write_file(&written.certificate, certificate, CERTIFICATE_MODE, force)
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), RunError> {
    let write_error = |source| RunError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(write_error)?;
    // A replaced file keeps its old mode unless it is set again.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    file.write_all(contents.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

fn read_text(flag: &'static str, path: &Path) -> Result<String, RunError> {
    std::fs::read_to_string(path).map_err(|source| RunError::TlsFile {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn certificate_error(error: rcgen::Error) -> RunError {
    RunError::TlsIssue {
        reason: format!("cannot make the certificate: {error}"),
    }
}
