//! The error for input that breaks a documented rule. It sits at the bottom
//! of the module graph: the domain ([`crate::node`], [`crate::auth`]) and the
//! configuration validate with it, and the layers above wrap it.

/// A field of a request, a flag or a stored value that breaks a documented
/// rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
