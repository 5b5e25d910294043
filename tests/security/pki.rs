//! A CA and certificates signed by it, written as PEM files.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::steps::write_file;

/// A certificate file and its key file.
pub type CertAndKey = (String, String);

pub struct Pki<'a> {
    dir: &'a Path,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl<'a> Pki<'a> {
    pub fn new(dir: &'a Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { dir, ca }
    }

    pub fn ca_file(&self, name: &str) -> String {
        write_file(self.dir, &format!("{name}.pem"), &self.ca.pem())
    }

    /// A certificate for 127.0.0.1 and localhost, usable by a server and a
    /// client.
    pub fn issue(&self, name: &str) -> CertAndKey {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (
            write_file(self.dir, &format!("{name}.crt"), &cert.pem()),
            write_file(self.dir, &format!("{name}.key"), &key.serialize_pem()),
        )
    }

    /// Trusts this CA, and presents `identity` if there is one.
    pub fn client(&self, identity: Option<&CertAndKey>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca.pem()));
        match identity {
            Some((cert, key)) => config.identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            )),
            None => config,
        }
    }
}
