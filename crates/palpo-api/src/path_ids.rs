//! Identifiers in the path (`{roomId}`, `{userId}`...), checked for their sigil before the
//! operation runs: a value without it is 400 `M_INVALID_PARAM` on every endpoint, and the
//! OpenAPI document shows the sigil as the parameter's `pattern`.
//!
//! poem-openapi's own `validator(pattern)` would do both, but it compiles its regular
//! expression again on every request (1.4% of the server's CPU under load); a sigil is one
//! byte to compare.

use std::{borrow::Cow, fmt, marker::PhantomData, ops::Deref};

use poem_openapi::{
    registry::{MetaSchema, MetaSchemaRef},
    types::{ParseError, ParseFromParameter, ParseResult, Type},
};

/// Which identifier a path parameter holds: the sigils it may start with.
pub trait Sigil: Send + Sync + 'static {
    /// The sigils accepted.
    const SIGILS: &'static [char];
    /// The `pattern` documented (a regular expression matching the accepted starts).
    const PATTERN: &'static str;
    /// What the identifier is, for the error message.
    const WHAT: &'static str;
}

macro_rules! sigil {
    ($(#[$doc:meta])* $kind:ident, $alias:ident, [$($sigil:literal),+], $pattern:literal, $what:literal) => {
        $(#[$doc])*
        pub enum $kind {}

        impl Sigil for $kind {
            const SIGILS: &'static [char] = &[$($sigil),+];
            const PATTERN: &'static str = $pattern;
            const WHAT: &'static str = $what;
        }

        $(#[$doc])*
        pub type $alias = WithSigil<$kind>;
    };
}

sigil!(
    /// `{roomId}`: `!opaque:server`.
    Room, RoomIdParam, ['!'], "^!", "A room ID starts with `!`"
);
sigil!(
    /// `{userId}`: `@localpart:server`.
    User, UserIdParam, ['@'], "^@", "A user ID starts with `@`"
);
sigil!(
    /// `{eventId}`: `$opaque` (with `:server` in old room versions).
    Event, EventIdParam, ['$'], "^[$]", "An event ID starts with `$`"
);
sigil!(
    /// `{roomAlias}`: `#alias:server`.
    Alias, RoomAliasParam, ['#'], "^#", "A room alias starts with `#`"
);
sigil!(
    /// `{roomIdOrAlias}`: a room ID or a room alias.
    RoomOrAlias, RoomIdOrAliasParam, ['!', '#'], "^[!#]",
    "A room ID or alias starts with `!` or `#`"
);

/// A path parameter that starts with one of `K`'s sigils. Reads as the `str` it holds.
pub struct WithSigil<K>(String, PhantomData<K>);

impl<K> Deref for WithSigil<K> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<K> fmt::Debug for WithSigil<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<K: Sigil> Type for WithSigil<K> {
    const IS_REQUIRED: bool = true;

    type RawValueType = Self;

    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            pattern: Some(K::PATTERN.to_owned()),
            ..MetaSchema::new("string")
        }))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl<K: Sigil> ParseFromParameter for WithSigil<K> {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        if value.starts_with(K::SIGILS) {
            Ok(WithSigil(value.to_owned(), PhantomData))
        } else {
            Err(ParseError::custom(K::WHAT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_needs_one_of_its_sigils() {
        let room = RoomIdParam::parse_from_parameter("!r:example.org").expect("room id");
        assert_eq!(&*room, "!r:example.org");
        assert!(RoomIdParam::parse_from_parameter("#a:example.org").is_err());
        assert!(RoomIdParam::parse_from_parameter("").is_err());
        assert!(UserIdParam::parse_from_parameter("alice").is_err());
        assert!(EventIdParam::parse_from_parameter("$e").is_ok());
        assert!(RoomAliasParam::parse_from_parameter("!r:example.org").is_err());
        for value in ["!r:example.org", "#a:example.org"] {
            assert!(RoomIdOrAliasParam::parse_from_parameter(value).is_ok());
        }
        assert!(RoomIdOrAliasParam::parse_from_parameter("@u:example.org").is_err());
    }

    #[test]
    fn the_document_shows_the_sigil_as_a_pattern() {
        let MetaSchemaRef::Inline(schema) = RoomIdOrAliasParam::schema_ref() else {
            panic!("an inline schema");
        };
        assert_eq!(schema.ty, "string");
        assert_eq!(schema.pattern.as_deref(), Some("^[!#]"));
    }
}
