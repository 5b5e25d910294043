//! Checks of certificates as they are loaded, so that a certificate rustls
//! would refuse in the middle of a handshake (with a message naming neither
//! the file nor its role) is refused at start-up, by flag, file and cause.

use std::path::Path;

use x509_parser::{certificate::X509Certificate, pem::Pem, prelude::X509Version, time::ASN1Time};

use crate::error::RunError;

/// The extended key usages a process's own certificate allows. A
/// certificate without the extension allows every usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usages {
    pub server_auth: bool,
    pub client_auth: bool,
}

const MAKE_ONE: &str = "(make one with `muster tls cert`)";

/// Checks the certificate a process presents (`--tls-cert`): X.509 v3, not
/// a CA, valid now. Returns the usages it allows, which are checked when the
/// process takes a role.
pub fn own_certificate(flag: &'static str, path: &Path, pem: &[u8]) -> Result<Usages, RunError> {
    let refuse = |problem: String| RunError::TlsCertificate {
        flag,
        path: path.to_owned(),
        problem,
    };
    let block = first_certificate(pem).ok_or_else(|| refuse("holds no certificate".to_owned()))?;
    let certificate = block
        .parse_x509()
        .map_err(|e| refuse(format!("is not a valid X.509 certificate ({e})")))?;
    if certificate.version() != X509Version::V3 {
        return Err(refuse(format!(
            "certificate is X.509 v{}; muster needs v3, with the host names in subjectAltName and the serverAuth and clientAuth usages {MAKE_ONE}",
            certificate.version().0 + 1
        )));
    }
    if certificate.is_ca() {
        return Err(refuse(format!(
            "is a CA certificate; give it as --tls-ca, and give this process a certificate of its own {MAKE_ONE}"
        )));
    }
    check_validity(&certificate).map_err(refuse)?;
    let usages = match certificate.extended_key_usage() {
        Ok(None) => Usages {
            server_auth: true,
            client_auth: true,
        },
        Ok(Some(extension)) => Usages {
            server_auth: extension.value.any || extension.value.server_auth,
            client_auth: extension.value.any || extension.value.client_auth,
        },
        Err(e) => {
            return Err(refuse(format!(
                "has an unreadable extended key usage ({e})"
            )));
        }
    };
    Ok(usages)
}

/// Checks every certificate of a CA file (`--tls-ca`): each must parse, and
/// at least one must be valid now. A bundle (a system's trust store) may
/// carry a root that has expired; rustls passes over it, and so does this
/// check, with a warning.
pub fn ca_certificates(flag: &'static str, path: &Path, pem: &[u8]) -> Result<(), RunError> {
    let refuse = |problem: String| RunError::TlsCertificate {
        flag,
        path: path.to_owned(),
        problem,
    };
    let mut first_invalid = None;
    let mut any_valid = false;
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| refuse(format!("is not valid PEM ({e})")))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let certificate = block
            .parse_x509()
            .map_err(|e| refuse(format!("is not a valid X.509 certificate ({e})")))?;
        match check_validity(&certificate) {
            Ok(()) => any_valid = true,
            Err(problem) => {
                tracing::warn!(
                    flag,
                    path = %path.display(),
                    subject = %certificate.subject(),
                    %problem,
                    "passing over a CA certificate that is not valid now"
                );
                first_invalid.get_or_insert(problem);
            }
        }
    }
    match first_invalid {
        Some(problem) if !any_valid => Err(refuse(problem)),
        _ => Ok(()),
    }
}

fn first_certificate(pem: &[u8]) -> Option<Pem> {
    Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|block| block.label == "CERTIFICATE")
}

fn check_validity(certificate: &X509Certificate<'_>) -> Result<(), String> {
    let validity = certificate.validity();
    let now = ASN1Time::now();
    if now < validity.not_before {
        return Err(format!(
            "certificate is not valid before {}",
            validity.not_before
        ));
    }
    if now > validity.not_after {
        return Err(format!("certificate expired on {}", validity.not_after));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, IsCa, KeyPair};
    use time::{Duration, OffsetDateTime};

    use super::*;

    fn ca_pem(name: &str, expired: bool) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = if expired {
            (now - Duration::days(30), now - Duration::days(1))
        } else {
            (now - Duration::days(1), now + Duration::days(30))
        };
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_bundle_with_an_expired_root_among_valid_ones_is_accepted() {
        let bundle = format!(
            "# a system trust store\n{}{}",
            ca_pem("old root", true),
            ca_pem("current root", false)
        );
        ca_certificates("--tls-ca", Path::new("bundle.pem"), bundle.as_bytes()).unwrap();
    }

    #[test]
    fn a_ca_file_with_only_expired_certificates_is_refused() {
        let expired = ca_pem("old root", true);
        let refused = ca_certificates("--tls-ca", Path::new("ca.pem"), expired.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("expired"), "{refused}");
        assert!(refused.contains("--tls-ca"), "{refused}");
    }
}
