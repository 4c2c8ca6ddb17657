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
    }
}
