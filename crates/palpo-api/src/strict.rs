//! Strict JSON strings for request bodies.
//!
//! poem-openapi's `String` also accepts a JSON number or boolean and turns it into text, so
//! `{"type": 5}` or `{"password": 7}` would be taken as `"5"` and `"7"`. Matrix wants such a
//! body refused with `M_BAD_JSON`, so string fields of request objects use these:
//! `#[oai(deserialize_with = "crate::strict::string")]`. The schema is unchanged.

use poem_openapi::types::{ParseError, ParseResult};
use serde_json::Value;

/// A required string.
pub fn string(value: Option<Value>) -> ParseResult<String> {
    match value {
        Some(Value::String(s)) => Ok(s),
        other => Err(ParseError::expected_type(other.unwrap_or_default())),
    }
}

/// An optional string: absent or `null` is `None`.
pub fn optional_string(value: Option<Value>) -> ParseResult<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ParseError::expected_type(other)),
    }
}

/// A required array of strings.
pub fn string_list(value: Option<Value>) -> ParseResult<Vec<String>> {
    match value {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(ParseError::expected_type(other)),
            })
            .collect(),
        other => Err(ParseError::expected_type(other.unwrap_or_default())),
    }
}

/// An optional array of strings: absent or `null` is `None`.
pub fn optional_string_list(value: Option<Value>) -> ParseResult<Option<Vec<String>>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        other => string_list(other).map(Some).map_err(ParseError::propagate),
    }
}

/// An optional array of strings and `null`s: absent or `null` is `None`.
pub fn optional_nullable_string_list(
    value: Option<Value>,
) -> ParseResult<Option<Vec<Option<String>>>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(Some(s)),
                Value::Null => Ok(None),
                other => Err(ParseError::expected_type(other)),
            })
            .collect::<ParseResult<Vec<_>>>()
            .map(Some)
            .map_err(ParseError::propagate),
        Some(other) => Err(ParseError::expected_type(other)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_json_strings_are_strings() {
        assert_eq!(string(Some(json!("x"))).ok(), Some("x".to_owned()));
        assert!(string(Some(json!(5))).is_err());
        assert!(string(Some(json!(true))).is_err());
        assert!(string(None).is_err());
        assert_eq!(optional_string(None).ok(), Some(None));
        assert_eq!(optional_string(Some(Value::Null)).ok(), Some(None));
        assert!(optional_string(Some(json!(7))).is_err());
        assert_eq!(optional_string_list(None).ok(), Some(None));
        assert!(optional_string_list(Some(json!([1]))).is_err());
        assert_eq!(
            optional_nullable_string_list(Some(json!(["m.space", null]))).ok(),
            Some(Some(vec![Some("m.space".to_owned()), None]))
        );
        assert!(optional_nullable_string_list(Some(json!([true]))).is_err());
        assert!(optional_nullable_string_list(Some(json!("m.space"))).is_err());
        assert_eq!(
            string_list(Some(json!(["a", "b"]))).ok(),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert!(string_list(Some(json!(["a", 1]))).is_err());
        assert!(string_list(Some(json!("a"))).is_err());
    }
}
