//! The `--db` value: a SQLite file (the default) or a PostgreSQL server.
//!
//! Invariant: a PostgreSQL URL's password never leaves this type in text:
//! `Display`, `Debug` and parse errors show `***` in its place. Only
//! [`PostgresUrl::expose`] hands the full URL over, to the store that
//! connects with it.

use std::{
    ffi::OsStr,
    fmt,
    path::{Path, PathBuf},
};

/// Where the coordinator keeps its state.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite database file, served by one coordinator at a time.
    Sqlite(PathBuf),
    /// A PostgreSQL database, which several coordinators may share.
    Postgres(PostgresUrl),
}

/// A `postgres://` or `postgresql://` connection URL, as libpq reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: String,
}

/// Why a `--db` value is not a usable PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--db {shown} is not a valid PostgreSQL URL: {reason}")]
pub struct InvalidDatabase {
    shown: String,
    reason: String,
}

const SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

impl Database {
    /// A value starting with `postgres://` or `postgresql://` is a
    /// PostgreSQL URL, and must parse as one; anything else is a file path.
    pub fn parse(value: &str) -> Result<Self, InvalidDatabase> {
        if !SCHEMES
            .iter()
            .any(|scheme| starts_with_ignore_case(value, scheme))
        {
            return Ok(Self::Sqlite(PathBuf::from(value)));
        }
        PostgresUrl::parse(value).map(Self::Postgres)
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(path) => Some(path),
            Self::Postgres(_) => None,
        }
    }
}

impl Default for Database {
    fn default() -> Self {
        Self::Sqlite(PathBuf::from("muster.db"))
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Self {
        Self::Sqlite(path)
    }
}

impl From<&Path> for Database {
    fn from(path: &Path) -> Self {
        Self::Sqlite(path.to_owned())
    }
}

impl From<&PathBuf> for Database {
    fn from(path: &PathBuf) -> Self {
        Self::Sqlite(path.clone())
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => path.display().fmt(f),
            Self::Postgres(url) => url.fmt(f),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(url).finish(),
        }
    }
}

impl PostgresUrl {
    pub fn parse(value: &str) -> Result<Self, InvalidDatabase> {
        let invalid = |reason: String| InvalidDatabase {
            shown: redact(value),
            reason,
        };
        let parsed = url::Url::parse(value).map_err(|error| invalid(error.to_string()))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(invalid(format!("unknown scheme {:?}", parsed.scheme())));
        }
        if parsed.cannot_be_a_base() || !value[parsed.scheme().len()..].starts_with("://") {
            return Err(invalid(
                "expected postgres://[user[:password]@]host[:port]/database".to_owned(),
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host".to_owned()));
        }
        Ok(Self {
            url: value.to_owned(),
        })
    }

    /// The URL with its password, for the connection only: never log it.
    pub fn expose(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact(&self.url))
    }
}

/// `value` with the password of its user-info, and any `password=` query
/// parameter, replaced by `***`; works on text that is not a valid URL too.
fn redact(value: &str) -> String {
    let (before_query, query) = match value.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (value, None),
    };
    let mut shown = match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((user_info, host)) => match user_info.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => before_query.to_owned(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => parameter.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&parameters.join("&"));
    }
    shown
}

fn starts_with_ignore_case(value: &str, prefix: &str) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Parses `--db` for clap. Its own parser, because clap's own error for a
/// refused value repeats the value, password and all.
#[derive(Clone, Copy, Debug, Default)]
pub struct DatabaseParser;

impl clap::builder::TypedValueParser for DatabaseParser {
    type Value = Database;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Database, clap::Error> {
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                "--db is not valid UTF-8\n",
            )
            .with_cmd(cmd)
        })?;
        Database::parse(text).map_err(|error| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{error}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_sqlite_and_a_postgres_url_is_postgres() {
        assert_eq!(
            Database::parse("muster.db").unwrap(),
            Database::Sqlite(PathBuf::from("muster.db"))
        );
        assert_eq!(
            Database::parse("/var/lib/muster/postgres.db").unwrap(),
            Database::Sqlite(PathBuf::from("/var/lib/muster/postgres.db"))
        );
        for url in [
            "postgres://muster@127.0.0.1:5432/muster",
            "postgresql://db.example/muster?sslmode=disable",
            "POSTGRES://[::1]:5433/muster",
        ] {
            let Database::Postgres(parsed) = Database::parse(url).unwrap() else {
                panic!("{url} is not PostgreSQL");
            };
            assert_eq!(parsed.expose(), url);
        }
    }

    #[test]
    fn the_password_is_never_shown() {
        let db = Database::parse("postgres://muster:s3cret@db:5432/muster?password=other").unwrap();
        for shown in [db.to_string(), format!("{db:?}")] {
            assert!(
                !shown.contains("s3cret") && !shown.contains("other"),
                "{shown}"
            );
            assert!(shown.contains("muster:***@db:5432/muster"), "{shown}");
        }
        let refused = Database::parse("postgres://muster:s3cret@db:notaport/muster")
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("--db postgres://muster:***@db"),
            "{refused}"
        );
        assert!(!refused.contains("s3cret"), "{refused}");
    }

    #[test]
    fn a_malformed_url_is_refused_naming_the_flag() {
        for bad in [
            "postgres://",
            "postgres:///muster",
            "postgresql://h:99999/db",
        ] {
            let refused = Database::parse(bad).unwrap_err().to_string();
            assert!(refused.starts_with("--db "), "{bad}: {refused}");
        }
    }
}
