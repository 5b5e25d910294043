//! `muster tls ca` and `muster tls cert`: write a CA and certificates, and
//! say which files were written.

use std::io::Write;

use crate::{config::TlsCommand, error::RunError, tls::issue};

pub fn run_tls(command: TlsCommand, out: &mut impl Write) -> Result<(), RunError> {
    let written = match &command {
        TlsCommand::Ca(config) => issue::make_ca(config)?,
        TlsCommand::Cert(config) => issue::make_cert(config)?,
    };
    writeln!(out, "wrote {}", written.certificate.display())?;
    writeln!(
        out,
        "wrote {} (private key, mode 0600)",
        written.key.display()
    )?;
    Ok(())
}
