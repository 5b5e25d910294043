//! Property tests of message validation: random bytes decoded as an
//! `AgentMessage`, and structured garbage in every field of `register`, go
//! through the same checks a Heartbeat stream's first message does. Nothing
//! panics, every refusal is an invalid argument or an out-of-order message,
//! and whatever is accepted keeps the documented rules. `PROPTEST_CASES` sets
//! how many cases run (256 by default).

use std::{collections::HashMap, time::Duration};

use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::{
    coordinator::read_registration,
    error::ServiceError,
    proto::{self, AgentMessage},
};

/// Runs `message` as the first message of a stream through the
/// coordinator's own check.
fn first_message(message: AgentMessage) -> Result<Claim, ServiceError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut inbound = futures::stream::iter([Ok::<_, tonic::Status>(message)]);
    runtime.block_on(read_registration(&mut inbound, Duration::from_secs(1)))
}

fn check_accepted(claim: &Claim) -> Result<(), TestCaseError> {
    let registration = &claim.registration;
    prop_assert!(NodeId::parse("node_id", registration.node_id.as_str()).is_ok());
    prop_assert!(validate_url("agent_url", &registration.agent_url).is_ok());
    prop_assert!(!registration.boot_id.is_empty());
    for value in [
        &registration.boot_id,
        &registration.version,
        &registration.hostname,
    ] {
        prop_assert!(value.len() <= MAX_SHORT_FIELD_LEN);
        prop_assert!(!value.chars().any(char::is_control));
    }
    prop_assert!(registration.max_backoff <= MAX_MAX_BACKOFF);
    prop_assert!(registration.labels.len() <= MAX_LABELS);
    for (key, value) in &registration.labels {
        prop_assert!(!key.is_empty() && key.len() <= MAX_LABEL_KEY_LEN);
        prop_assert!(value.len() <= MAX_LABEL_VALUE_LEN);
        prop_assert!(!key.chars().chain(value.chars()).any(char::is_control));
    }
    Ok(())
}

fn check(outcome: Result<Claim, ServiceError>) -> Result<(), TestCaseError> {
    match outcome {
        Ok(claim) => check_accepted(&claim),
        Err(ServiceError::InvalidArgument(_) | ServiceError::OutOfOrder(_)) => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!("refused as {other:?}"))),
    }
}

/// Text that is sometimes valid, often nearly so, and sometimes anything.
fn text(valid: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => valid.prop_map(|s: String| s),
        1 => Just(String::new()),
        1 => "[ -~]{0,80}",
        1 => any::<String>(),
        1 => (0..3000usize).prop_map(|n| "x".repeat(n)),
    ]
}

fn register() -> impl Strategy<Value = proto::Register> {
    (
        text("[a-z0-9][a-z0-9._-]{0,62}"),
        text("https?://[a-z0-9.-]{1,20}:[0-9]{1,5}(/[a-z]{0,5})?"),
        text("[a-f0-9-]{1,36}"),
        text("[0-9.]{0,10}"),
        text("[a-z0-9.-]{0,20}"),
        prop::collection::hash_map(text("[a-z]{1,10}"), text("[a-z0-9]{0,10}"), 0..70),
        text("[A-Za-z0-9_-]{16,64}"),
        prop::option::of((any::<i64>(), any::<i32>())),
    )
        .prop_map(
            |(node_id, agent_url, boot_id, version, hostname, labels, node_secret, backoff)| {
                proto::Register {
                    node_id,
                    agent_url,
                    boot_id,
                    version,
                    hostname,
                    labels: labels.into_iter().collect::<HashMap<_, _>>(),
                    node_secret,
                    max_backoff: backoff
                        .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                    inventory: None,
                }
            },
        )
}

proptest! {
    #[test]
    fn random_bytes_never_get_past_validation_unchecked(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(message) = AgentMessage::decode(bytes.as_slice()) {
            check(first_message(message))?;
        }
    }

    #[test]
    fn garbage_in_every_register_field_is_refused_as_invalid_input(register in register()) {
        let claimed = Claim::try_from(register.clone());
        if let Err(invalid) = &claimed {
            prop_assert!(invalid.field.starts_with("register."), "{}", invalid.field);
        }
        // The same message, sent over the wire, meets the same fate.
        let message = AgentMessage { kind: Some(proto::agent_message::Kind::Register(register)) };
        let decoded = AgentMessage::decode(message.encode_to_vec().as_slice()).expect("round trip");
        let outcome = first_message(decoded);
        prop_assert_eq!(outcome.is_ok(), claimed.is_ok());
        check(outcome)?;
    }
}
