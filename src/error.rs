//! Errors a caller decides on: bad input exits 2 and changes nothing; anything else exits 1.

/// Bad input or usage: names the record, the field and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

impl InputError {
    pub fn field(record: &str, field: &str, reason: impl std::fmt::Display) -> Self {
        InputError(format!("{record}: field `{field}`: {reason}"))
    }
}

/// Exit code for an error chain: 2 if any cause is bad input, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|c| c.downcast_ref::<InputError>().is_some()) {
        2
    } else {
        1
    }
}
