//! Label selectors of the form `k=v,k2=v2`: a node matches when it carries
//! every listed label with exactly that value. Only equality is supported;
//! an empty selector matches every node.

use std::{collections::BTreeMap, fmt};

use crate::{
    node::{MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS},
    validation::InvalidInput,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    required: BTreeMap<String, String>,
}

impl LabelSelector {
    /// Parses `k=v,k2=v2`. Whitespace around terms, keys and values is
    /// ignored; an empty or all-blank string is the empty selector.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InvalidInput> {
        let mut required = BTreeMap::new();
        if raw.trim().is_empty() {
            return Ok(Self { required });
        }
        for (position, term) in raw.split(',').enumerate() {
            let number = position + 1;
            let term = term.trim();
            if term.is_empty() {
                return Err(InvalidInput::new(
                    field,
                    format!("term {number} is empty in {raw:?}; write k=v,k2=v2"),
                ));
            }
            if let Some(bad) = term.chars().find(|c| c.is_control()) {
                return Err(InvalidInput::new(
                    field,
                    format!("term {number} contains the control character {bad:?}"),
                ));
            }
            let Some((key, value)) = term.split_once('=') else {
                return Err(InvalidInput::new(
                    field,
                    format!("term {number} ({term:?}) has no '='; write key=value"),
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            if value.contains('=') {
                return Err(InvalidInput::new(
                    field,
                    format!(
                        "term {number} ({term:?}) has more than one '='; only key=value is supported"
                    ),
                ));
            }
            if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
                return Err(InvalidInput::new(
                    field,
                    format!(
                        "term {number} ({term:?}) needs a key of 1 to {MAX_LABEL_KEY_LEN} bytes"
                    ),
                ));
            }
            if value.len() > MAX_LABEL_VALUE_LEN {
                return Err(InvalidInput::new(
                    field,
                    format!("value of {key:?} must be at most {MAX_LABEL_VALUE_LEN} bytes"),
                ));
            }
            if required.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(InvalidInput::new(
                    field,
                    format!("key {key:?} is given more than once"),
                ));
            }
        }
        if required.len() > MAX_LABELS {
            return Err(InvalidInput::new(
                field,
                format!(
                    "at most {MAX_LABELS} terms are allowed, got {}",
                    required.len()
                ),
            ));
        }
        Ok(Self { required })
    }

    pub fn is_empty(&self) -> bool {
        self.required.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.required
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// The canonical form, keys sorted: `parse` of it gives the same selector.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, (key, value)) in self.required.iter().enumerate() {
            if position > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_and_matches_equality_terms() {
        let selector = LabelSelector::parse("label_selector", " zone=a , gpu=a100").unwrap();
        assert_eq!(selector.to_string(), "gpu=a100,zone=a");
        assert!(selector.matches(&labels(&[("zone", "a"), ("gpu", "a100"), ("x", "y")])));
        assert!(!selector.matches(&labels(&[("zone", "a")])));
        assert!(!selector.matches(&labels(&[("zone", "b"), ("gpu", "a100")])));
        assert_eq!(
            LabelSelector::parse("s", &selector.to_string()).unwrap(),
            selector
        );
    }

    #[test]
    fn empty_selector_matches_everything() {
        for raw in ["", "   "] {
            let selector = LabelSelector::parse("label_selector", raw).unwrap();
            assert!(selector.is_empty());
            assert!(selector.matches(&BTreeMap::new()));
        }
    }

    #[test]
    fn an_empty_value_is_a_value() {
        let selector = LabelSelector::parse("label_selector", "spare=").unwrap();
        assert!(selector.matches(&labels(&[("spare", "")])));
        assert!(!selector.matches(&BTreeMap::new()));
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_reason() {
        let long_key = format!("{}=v", "k".repeat(MAX_LABEL_KEY_LEN + 1));
        let long_value = format!("k={}", "v".repeat(MAX_LABEL_VALUE_LEN + 1));
        let cases = [
            ("zone", "has no '='"),
            ("zone=a,,gpu=b", "term 2 is empty"),
            ("zone=a,", "term 2 is empty"),
            ("=a", "needs a key"),
            ("a=b=c", "more than one '='"),
            ("a=1,a=2", "more than once"),
            ("a=\u{7}", "control character"),
            (long_key.as_str(), "needs a key"),
            (long_value.as_str(), "at most"),
        ];
        for (raw, expected) in cases {
            let err = LabelSelector::parse("label_selector", raw).expect_err(raw);
            assert_eq!(err.field, "label_selector");
            assert!(
                err.reason.contains(expected),
                "{raw:?}: {} lacks {expected:?}",
                err.reason
            );
        }
    }

    #[test]
    fn too_many_terms_are_refused() {
        let raw: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        let err = LabelSelector::parse("label_selector", &raw.join(",")).unwrap_err();
        assert!(err.reason.contains("at most"), "{}", err.reason);
    }
}
