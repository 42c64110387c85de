//! Ids that end up inside NATS subjects.
//!
//! A space, CR/LF, `.`, `*` or `>` in a subject token would change which subject a
//! message goes to (or inject protocol commands), so every id that can reach a
//! subject is a newtype that can only be built from a string matching
//! `^[A-Za-z0-9_-]{1,64}$`. Deserialisation validates too, so a bad id in a request
//! never gets past decoding.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// The id grammar, as a regular expression.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid id: empty")]
    Empty,
    #[error("invalid id: {len} bytes, at most {MAX_ID_LEN} allowed")]
    TooLong { len: usize },
    #[error("invalid id {value:?}: character {ch:?} not allowed (use A-Z, a-z, 0-9, '_' or '-')")]
    BadChar { value: String, ch: char },
}

/// Checks that `s` is a subject-safe token.
pub fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(IdError::BadChar {
            value: s.chars().take(MAX_ID_LEN).collect(),
            ch,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": ID_PATTERN,
                    "minLength": 1,
                    "maxLength": MAX_ID_LEN,
                })
            }
        }

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate(&s)?;
                Ok(Self(s))
            }

            /// A fresh random id (a UUID v7 in simple form: time-ordered, 32 hex digits).
            pub fn random() -> Self {
                Self(uuid::Uuid::now_v7().simple().to_string())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// An agent: a worker process in any language that registers capacity and runs tasks.
    AgentId
);
id_type!(
    /// A task flow (a DAG of tasks).
    FlowId
);
id_type!(
    /// A task, unique within its flow.
    TaskId
);
id_type!(
    /// One allocation of resources on one agent.
    AllocationId
);
id_type!(
    /// A namespace of agent state documents with its own conflict policy, schema and invariants.
    ScopeId
);
id_type!(
    /// A sync point: a recorded consistent cut of a set of agents' states.
    SyncPointId
);

/// The scope a state request uses when it names none.
pub const DEFAULT_SCOPE: &str = "default";

impl Default for ScopeId {
    fn default() -> Self {
        ScopeId(DEFAULT_SCOPE.to_owned())
    }
}
id_type!(
    /// Capacity held on one agent for one owner over a time window.
    ReservationId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_tokens() {
        for ok in ["a", "agent-1", "A_b-9", &"x".repeat(64)] {
            assert!(AgentId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_that_could_change_a_subject() {
        for bad in [
            "",
            "a.b",
            "a*",
            ">",
            "a b",
            "a\r\nPUB x 1",
            "é",
            "a/b",
            &"x".repeat(65),
        ] {
            assert!(AgentId::new(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(AgentId::new(""), Err(IdError::Empty));
        assert_eq!(
            TaskId::new("a.b"),
            Err(IdError::BadChar {
                value: "a.b".into(),
                ch: '.'
            })
        );
        assert_eq!(
            FlowId::new("y".repeat(65)),
            Err(IdError::TooLong { len: 65 })
        );
    }

    #[test]
    fn deserialising_validates() {
        let ok: AgentId = serde_json::from_str("\"w-1\"").unwrap();
        assert_eq!(ok.as_str(), "w-1");
        let err = serde_json::from_str::<AgentId>("\"w.1\"").unwrap_err();
        assert!(err.to_string().starts_with("invalid id"), "{err}");
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"w-1\"");
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = FlowId::random();
        let b = FlowId::random();
        assert_ne!(a, b);
        assert!(validate(a.as_str()).is_ok());
    }
}
