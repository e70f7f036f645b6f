//! The validation rules of SPEC §2, written once for every protocol. A
//! [`Check`] collects every broken rule of one input so the client hears about
//! all of them at once, as FastAPI does.

use crate::error::{Error, FieldError, Result};

#[derive(Debug, Default)]
pub struct Check(Vec<FieldError>);

impl Check {
    pub fn new() -> Self {
        Check::default()
    }

    /// A string whose length in characters lies in `min..=max`.
    pub fn length(&mut self, field: &str, value: &str, min: usize, max: usize) -> &mut Self {
        let n = value.chars().count();
        if n < min {
            self.0.push(FieldError::new(
                field,
                "string_too_short",
                format!("String should have at least {min} character{}", plural(min)),
            ));
        } else if n > max {
            self.0.push(FieldError::new(
                field,
                "string_too_long",
                format!("String should have at most {max} character{}", plural(max)),
            ));
        }
        self
    }

    /// An integer in `min..=max`.
    pub fn range(&mut self, field: &str, value: i64, min: i64, max: i64) -> &mut Self {
        if value < min {
            self.0.push(ge_error(field, min));
        } else if value > max {
            self.0.push(FieldError::new(
                field,
                "less_than_equal",
                format!("Input should be less than or equal to {max}"),
            ));
        }
        self
    }

    /// A finite number that is not negative.
    pub fn non_negative(&mut self, field: &str, value: f64) -> &mut Self {
        if !value.is_finite() {
            self.0.push(FieldError::new(
                field,
                "finite_number",
                "Input should be a finite number",
            ));
        } else if value < 0.0 {
            self.0.push(ge_error(field, 0));
        }
        self
    }

    pub fn email(&mut self, field: &str, value: &str) -> &mut Self {
        if value.chars().count() > 254 || !email_address::EmailAddress::is_valid(value) {
            self.0.push(FieldError::new(
                field,
                "value_error",
                "value is not a valid email address",
            ));
        }
        self
    }

    /// A login name: [`limits::USERNAME`] letters, digits, `_`, `.` or `-`.
    pub fn username(&mut self, field: &str, value: &str) -> &mut Self {
        let (min, max) = limits::USERNAME;
        let ok = (min..=max).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            self.0.push(FieldError::new(
                field,
                "value_error",
                format!("Username must be {min} to {max} letters, digits, '_', '.' or '-'"),
            ));
        }
        self
    }

    /// A three-letter currency code (ISO 4217 shape).
    pub fn currency(&mut self, field: &str, value: &str) -> &mut Self {
        if !(value.len() == 3 && value.chars().all(|c| c.is_ascii_uppercase())) {
            self.0.push(FieldError::new(
                field,
                "value_error",
                "Currency must be a three-letter code such as USD",
            ));
        }
        self
    }

    pub fn push(&mut self, error: FieldError) -> &mut Self {
        self.0.push(error);
        self
    }

    pub fn finish(&mut self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Validation(std::mem::take(&mut self.0)))
        }
    }
}

pub fn ge_error(field: &str, min: i64) -> FieldError {
    FieldError::new(
        field,
        "greater_than_equal",
        format!("Input should be greater than or equal to {min}"),
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Reads an optional integer field of a JSON body as JSON Schema and
/// pydantic do: a number without a fractional part is an integer, so `3.0`
/// is 3 (Python's `json.dumps` writes floats that way). `3.5` and anything
/// outside `i64` are refused.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<i64>, D::Error> {
    struct Whole(i64);
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Whole;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            // "expected i64" is what the HTTP layer recognises as an integer error.
            f.write_str("i64")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Whole, E> {
            Ok(Whole(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Whole, E> {
            i64::try_from(v)
                .map(Whole)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Whole, E> {
            // 2^63 itself is a whole f64 that `as` would clamp to i64::MAX.
            if v.fract() == 0.0 && v >= -(2f64.powi(63)) && v < 2f64.powi(63) {
                Ok(Whole(v as i64))
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    impl<'de> serde::Deserialize<'de> for Whole {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Whole, D::Error> {
            d.deserialize_i64(Visitor)
        }
    }
    Ok(<Option<Whole> as serde::Deserialize>::deserialize(d)?.map(|w| w.0))
}

/// Field limits of SPEC §2.
pub mod limits {
    pub const NAME: (usize, usize) = (1, 100);
    pub const TITLE: (usize, usize) = (1, 200);
    pub const CONTENT: (usize, usize) = (1, 10_000);
    pub const DESCRIPTION: (usize, usize) = (0, 10_000);
    pub const PASSWORD: (usize, usize) = (8, 128);
    pub const AGE: (i64, i64) = (0, 150);
    pub const TAG: (usize, usize) = (1, 50);
    pub const MAX_TAGS: usize = 50;
    pub const MAX_METADATA: usize = 50;
    pub const METADATA_KEY: (usize, usize) = (1, 100);
    pub const METADATA_VALUE: (usize, usize) = (0, 1000);
    pub const USERNAME: (usize, usize) = (3, 50);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_error() {
        let err = Check::new()
            .length("name", "", 1, 100)
            .email("email", "not-an-email")
            .range("age", 151, 0, 150)
            .finish()
            .unwrap_err();
        let Error::Validation(fields) = err else {
            panic!()
        };
        let names: Vec<_> = fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, ["name", "email", "age"]);
    }

    #[test]
    fn accepts_valid_input() {
        Check::new()
            .length("name", "Alice", 1, 100)
            .email("email", "alice@example.com")
            .range("age", 30, 0, 150)
            .currency("currency", "USD")
            .non_negative("amount", 0.0)
            .finish()
            .unwrap();
    }

    #[test]
    fn counts_characters_not_bytes() {
        Check::new()
            .length("name", &"é".repeat(100), 1, 100)
            .finish()
            .unwrap();
        assert!(
            Check::new()
                .length("name", &"é".repeat(101), 1, 100)
                .finish()
                .is_err()
        );
    }

    #[test]
    fn rejects_bad_numbers_and_codes() {
        assert!(Check::new().non_negative("a", -0.01).finish().is_err());
        assert!(Check::new().non_negative("a", f64::NAN).finish().is_err());
        assert!(Check::new().currency("c", "usd").finish().is_err());
        assert!(Check::new().currency("c", "DOLLAR").finish().is_err());
        assert!(Check::new().username("u", "a b").finish().is_err());
    }
}
