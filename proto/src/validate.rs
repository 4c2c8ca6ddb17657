//! Field checks every gRPC edge applies to what arrives on the wire. A failed
//! check is a [`FieldError`] naming the field; each service turns it into its
//! own `INVALID_ARGUMENT`.

/// A request field that failed validation, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// A required, bounded, printable string, trimmed.
pub fn required<'a>(field: &str, value: &'a str, max_len: usize) -> Result<&'a str, FieldError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(FieldError::new(
            field,
            format!("must be at most {max_len} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value)
}

/// An optional string: empty means absent.
pub fn optional(field: &str, value: &str, max_len: usize) -> Result<Option<String>, FieldError> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        required(field, value, max_len).map(|v| Some(v.to_owned()))
    }
}

/// The last second of the year 9999, the latest instant accepted.
const LATEST_SECOND: i64 = 253_402_300_799;

/// A wire timestamp as unix milliseconds: not before 1970, not after the
/// year 9999, nanoseconds within their second.
pub fn instant(field: &str, at: &prost_types::Timestamp) -> Result<i64, FieldError> {
    if at.seconds < 0 {
        return Err(FieldError::new(field, "must not be before 1970"));
    }
    if at.seconds > LATEST_SECOND {
        return Err(FieldError::new(field, "must not be after the year 9999"));
    }
    if !(0..1_000_000_000).contains(&at.nanos) {
        return Err(FieldError::new(field, "nanos must be within 0..1e9"));
    }
    Ok(crate::clock::from_timestamp(at))
}

/// A repeated field with at least one and at most `max` rows.
pub fn bounded<T>(field: &str, rows: &[T], max: usize) -> Result<(), FieldError> {
    if rows.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if rows.len() > max {
        return Err(FieldError::new(field, format!("at most {max} per call")));
    }
    Ok(())
}

/// A command-line URL of a gRPC server: `http://…` or `https://…` (clap's
/// value parser for `chukei-health` and `chukei-conformance`).
pub fn url_argument(value: &str) -> Result<String, String> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.to_owned())
    } else {
        Err("must start with http:// or https://".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            required("a.b", "  ", 5).unwrap_err().to_string(),
            "a.b: must not be empty"
        );
        assert!(
            required("a", "toolong", 3)
                .unwrap_err()
                .reason
                .contains("at most 3")
        );
        assert!(required("a", "x\u{7}", 3).is_err());
        assert_eq!(required("a", " ok ", 3), Ok("ok"));
        assert_eq!(optional("a", "", 3), Ok(None));
        assert!(bounded::<u8>("rows", &[], 2).is_err());
        assert!(bounded("rows", &[1, 2, 3], 2).is_err());
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(instant("t", &at(1, 5_000_000)), Ok(1_005));
        for bad in [at(-1, 0), at(i64::MAX, 0), at(0, -1), at(0, 1_000_000_000)] {
            assert_eq!(instant("t", &bad).unwrap_err().field, "t");
        }
    }
}
