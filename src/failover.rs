//! Several coordinators, one of them leading: the list of URLs that an
//! agent's or the CLI's `--coordinator` takes, the leader hint a standby
//! gives, and the choice of the URL to try next.
//!
//! Invariants:
//! - A [`CoordinatorUrls`] holds at least one URL; each passed
//!   [`validate_url`], and no two name the same coordinator (compared with
//!   scheme and host in lower case, without a trailing `/`).
//! - A hint is followed only to a URL of the list. A standby's hint travels
//!   in plain response metadata; were any URL accepted, one rogue or
//!   misconfigured coordinator could send every agent (with its join token)
//!   and every operator (with the admin token) to a host of its choosing.
//!   A hint outside the list is logged and treated as no hint.
//! - [`Cursor`] follows at most [`MAX_HINT_HOPS`] hints in a row without a
//!   success in between, so two coordinators that name each other cannot
//!   keep a client dialling without a pause.

use tonic::{Code, Status, codegen::http::Uri};

use crate::{error::InvalidInput, node::validate_url};

/// Response metadata in which a standby names the leader's URL when it
/// refuses a call with UNAVAILABLE.
pub const LEADER_METADATA: &str = "x-muster-leader";

/// Hints followed in a row, without a success, before a client falls back
/// to trying the next URL.
pub const MAX_HINT_HOPS: u32 = 3;

/// The coordinators a client may dial, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorUrls(Vec<String>);

impl CoordinatorUrls {
    /// Parses a comma-separated list; `flag` names the setting in errors.
    /// Spaces around a URL are ignored; an empty entry or a repeated
    /// coordinator is an error.
    pub fn parse(flag: &'static str, raw: &str) -> Result<Self, InvalidInput> {
        let mut urls: Vec<String> = Vec::new();
        for (position, entry) in raw.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                return Err(InvalidInput::new(
                    flag,
                    format!(
                        "entry {} of {raw:?} is empty; separate URLs with single commas",
                        position + 1
                    ),
                ));
            }
            validate_url(flag, entry)?;
            if let Some(earlier) = urls.iter().find(|url| same_coordinator(url, entry)) {
                return Err(InvalidInput::new(
                    flag,
                    format!("{entry:?} repeats {earlier:?}; name each coordinator once"),
                ));
            }
            urls.push(entry.to_owned());
        }
        Ok(Self(urls))
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, index: usize) -> &str {
        &self.0[index % self.0.len()]
    }

    /// Where `url` stands in the list, if it names one of its coordinators.
    pub fn position(&self, url: &str) -> Option<usize> {
        self.0.iter().position(|known| same_coordinator(known, url))
    }
}

impl std::fmt::Display for CoordinatorUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Whether two URLs name the same coordinator: scheme and host compare
/// without case, and a trailing `/` does not count.
fn same_coordinator(a: &str, b: &str) -> bool {
    match (canonical(a), canonical(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

fn canonical(url: &str) -> Option<String> {
    let uri: Uri = url.trim().parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?.as_str().to_ascii_lowercase();
    let path = uri.path().trim_end_matches('/');
    Some(format!("{scheme}://{authority}{path}"))
}

/// The leader's URL, if `status` is a standby's refusal that names it.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let hint = status.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    let hint = hint.trim();
    (!hint.is_empty()).then(|| hint.to_owned())
}

/// Why a client moves on from the coordinator it last tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// The coordinator named the leader, one of the list: dial it now.
    FollowHint { to: usize },
    /// The coordinator named a leader that is not in the list; the hint is
    /// ignored, and the client moves on as if there were none.
    HintRefused { hint: String, to: usize },
    /// Hints followed in a row reached [`MAX_HINT_HOPS`] without success.
    TooManyHops { to: usize },
    /// No usable hint: the next URL, after the usual backoff.
    Next { to: usize },
}

impl Switch {
    /// The index of the URL to try next.
    pub fn to(&self) -> usize {
        match self {
            Self::FollowHint { to }
            | Self::HintRefused { to, .. }
            | Self::TooManyHops { to }
            | Self::Next { to } => *to,
        }
    }

    /// Whether the client dials at once rather than after a backoff.
    pub fn immediate(&self) -> bool {
        matches!(self, Self::FollowHint { .. })
    }

    /// Why, in a few words for a log line.
    pub fn reason(&self) -> String {
        match self {
            Self::FollowHint { .. } => "a standby named the leader".to_owned(),
            Self::HintRefused { hint, .. } => {
                format!("the leader it named, {hint}, is not in --coordinator; hint ignored")
            }
            Self::TooManyHops { .. } => {
                format!("{MAX_HINT_HOPS} leader hints in a row led nowhere")
            }
            Self::Next { .. } => "no leader hint".to_owned(),
        }
    }
}

/// Which coordinator of a list a client is on, and where it goes next.
#[derive(Debug, Clone)]
pub struct Cursor {
    current: usize,
    len: usize,
    hops: u32,
}

impl Cursor {
    pub fn new(urls: &CoordinatorUrls) -> Self {
        Self {
            current: 0,
            len: urls.len().max(1),
            hops: 0,
        }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// The current coordinator answered as it should: hints count afresh.
    pub fn succeeded(&mut self) {
        self.hops = 0;
    }

    /// Moves on after the current coordinator failed, following `hint` if
    /// it names another coordinator of `urls`.
    pub fn after_failure(&mut self, urls: &CoordinatorUrls, hint: Option<&str>) -> Switch {
        let next = (self.current + 1) % self.len;
        let switch = match hint.map(|hint| (hint, urls.position(hint))) {
            Some((_, Some(to))) if to != self.current && self.hops < MAX_HINT_HOPS => {
                self.hops += 1;
                Switch::FollowHint { to }
            }
            Some((_, Some(to))) if to != self.current => {
                self.hops = 0;
                Switch::TooManyHops { to: next }
            }
            Some((hint, None)) => Switch::HintRefused {
                hint: hint.to_owned(),
                to: next,
            },
            Some((_, Some(_))) | None => Switch::Next { to: next },
        };
        self.current = switch.to();
        switch
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn urls(raw: &str) -> CoordinatorUrls {
        CoordinatorUrls::parse("--coordinator", raw).unwrap()
    }

    #[test]
    fn one_url_parses_as_a_list_of_one() {
        let one = urls("http://127.0.0.1:7700");
        assert_eq!(one.urls(), ["http://127.0.0.1:7700"]);
        assert_eq!(one.to_string(), "http://127.0.0.1:7700");
    }

    #[test]
    fn a_list_keeps_its_order_and_ignores_spaces() {
        let list = urls("http://a:7700, https://b:7700 ,http://c:1");
        assert_eq!(
            list.urls(),
            ["http://a:7700", "https://b:7700", "http://c:1"]
        );
        assert_eq!(list.position("HTTP://B:7700/"), None, "scheme differs");
        assert_eq!(list.position("https://B:7700/"), Some(1));
        assert_eq!(list.position("http://d:7700"), None);
    }

    #[test]
    fn empty_entries_duplicates_and_bad_urls_are_refused_naming_the_flag() {
        for bad in [
            "",
            "http://a:1,",
            ",http://a:1",
            "http://a:1,,http://b:1",
            "http://a:1, ",
            "http://a:1,http://A:1/",
            "http://a:1,ftp://b:1",
            "http://a:1,http://b",
            "a:1",
        ] {
            let error = CoordinatorUrls::parse("--coordinator", bad).unwrap_err();
            assert_eq!(error.field, "--coordinator", "{bad:?}");
        }
        let error = CoordinatorUrls::parse("--coordinator", "http://a:1,http://a:1").unwrap_err();
        assert!(error.to_string().contains("repeats"), "{error}");
    }

    #[test]
    fn a_hint_is_read_only_from_an_unavailable_status() {
        let mut refused = Status::unavailable("standby");
        refused
            .metadata_mut()
            .insert(LEADER_METADATA, MetadataValue::from_static("http://b:1"));
        assert_eq!(leader_hint(&refused).as_deref(), Some("http://b:1"));
        let mut other = Status::permission_denied("no");
        other
            .metadata_mut()
            .insert(LEADER_METADATA, MetadataValue::from_static("http://b:1"));
        assert_eq!(leader_hint(&other), None);
        assert_eq!(leader_hint(&Status::unavailable("down")), None);
    }

    #[test]
    fn without_a_hint_the_next_url_follows_round_the_list() {
        let list = urls("http://a:1,http://b:1,http://c:1");
        let mut cursor = Cursor::new(&list);
        let visited: Vec<usize> = (0..4)
            .map(|_| {
                let switch = cursor.after_failure(&list, None);
                assert!(!switch.immediate());
                switch.to()
            })
            .collect();
        assert_eq!(visited, [1, 2, 0, 1]);
    }

    #[test]
    fn one_url_stays_on_it() {
        let list = urls("http://a:1");
        let mut cursor = Cursor::new(&list);
        assert_eq!(cursor.after_failure(&list, None), Switch::Next { to: 0 });
        assert_eq!(
            cursor.after_failure(&list, Some("http://a:1")),
            Switch::Next { to: 0 }
        );
    }

    #[test]
    fn a_hint_in_the_list_is_followed_at_once() {
        let list = urls("http://a:1,http://b:1,http://c:1");
        let mut cursor = Cursor::new(&list);
        let switch = cursor.after_failure(&list, Some("http://c:1/"));
        assert_eq!(switch, Switch::FollowHint { to: 2 });
        assert!(switch.immediate());
        assert_eq!(cursor.current(), 2);
    }

    #[test]
    fn a_hint_outside_the_list_is_not_followed() {
        let list = urls("http://a:1,http://b:1");
        let mut cursor = Cursor::new(&list);
        let switch = cursor.after_failure(&list, Some("http://evil:1"));
        assert_eq!(
            switch,
            Switch::HintRefused {
                hint: "http://evil:1".to_owned(),
                to: 1
            }
        );
        assert!(!switch.immediate());
    }

    #[test]
    fn a_hint_naming_the_refusing_coordinator_itself_counts_as_none() {
        let list = urls("http://a:1,http://b:1");
        let mut cursor = Cursor::new(&list);
        assert_eq!(
            cursor.after_failure(&list, Some("http://a:1")),
            Switch::Next { to: 1 }
        );
    }

    #[test]
    fn hints_that_go_round_in_circles_fall_back_to_the_backoff() {
        let list = urls("http://a:1,http://b:1");
        let mut cursor = Cursor::new(&list);
        let mut immediate = 0;
        for _ in 0..10 {
            let hint = if cursor.current() == 0 {
                "http://b:1"
            } else {
                "http://a:1"
            };
            let switch = cursor.after_failure(&list, Some(hint));
            if !switch.immediate() {
                assert!(matches!(switch, Switch::TooManyHops { .. }), "{switch:?}");
                break;
            }
            immediate += 1;
        }
        assert_eq!(immediate, MAX_HINT_HOPS);
        cursor.succeeded();
        let other = if cursor.current() == 0 {
            "http://b:1"
        } else {
            "http://a:1"
        };
        assert!(cursor.after_failure(&list, Some(other)).immediate());
    }
}
