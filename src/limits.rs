//! Operating-system limits that decide how many connections one process can
//! hold: open files, and ephemeral ports per source address.

use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The open-file limits of this process after [`raise_open_files`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    pub soft: u64,
    pub hard: u64,
}

/// This process's open-file limits as they stand.
pub fn open_files() -> io::Result<OpenFiles> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(OpenFiles { soft, hard })
}

/// Raises this process's soft limit on open files to its hard limit: every
/// connection is a file, and many systems start processes with a soft limit
/// of 1,024. Only the hard limit, which needs privilege to raise, stays.
pub fn raise_open_files() -> io::Result<OpenFiles> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    open_files()
}

/// How many ephemeral ports one source address can use towards one
/// destination, from `/proc/sys/net/ipv4/ip_local_port_range`.
pub fn ephemeral_ports() -> io::Result<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    parse_port_range(&range).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unreadable ip_local_port_range {range:?}"),
        )
    })
}

fn parse_port_range(range: &str) -> Option<u32> {
    let mut bounds = range.split_whitespace().map(str::parse::<u32>);
    let low = bounds.next()?.ok()?;
    let high = bounds.next()?.ok()?;
    (high >= low).then(|| high - low + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28232));
        assert_eq!(parse_port_range("1024 1024"), Some(1));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range(""), None);
    }

    #[test]
    fn the_soft_limit_only_goes_up() {
        let (before, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let limits = raise_open_files().unwrap();
        assert!(limits.soft >= before && limits.soft <= limits.hard);
    }
}
