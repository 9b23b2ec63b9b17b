//! Integer fields that accept integral JSON floats.
//!
//! JSON has one number type, and many clients (JavaScript, or Python after
//! arithmetic) send `64.0` for 64. serde's integer types refuse any float, so
//! the request types deserialize their integer fields through
//! [`option`]: an integer, or a float with no fractional part, within the
//! target type's range. `64.5`, `NaN`-free but fractional values, negatives
//! for unsigned fields and values out of range are refused with a message
//! saying the field must be an integer (or the range); serde_path_to_error
//! adds the field path. Strings stay refused (`"64"` is a type error).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, Visitor};

/// The largest float that is still an exact integer in an `f64` (2^53).
const MAX_EXACT_F64: f64 = 9_007_199_254_740_992.0;

struct IntegerVisitor<T>(PhantomData<T>);

impl<T: TryFrom<u64>> IntegerVisitor<T> {
    fn from_u64<E: de::Error>(v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| {
            E::custom(format!(
                "{v} is out of range (allowed: 0 to {})",
                max_of::<T>()
            ))
        })
    }
}

/// The largest u64 that converts into `T` (found by halving, as `T` is only
/// known by its `TryFrom<u64>`).
fn max_of<T: TryFrom<u64>>() -> u64 {
    for bits in [8u32, 16, 32] {
        let next = 1u64 << bits;
        if T::try_from(next).is_err() {
            return next - 1;
        }
    }
    u64::MAX
}

impl<'de, T: TryFrom<u64>> Visitor<'de> for IntegerVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Self::from_u64(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v)
            .map_err(|_| {
                E::custom(format!(
                    "{v} is out of range (allowed: 0 to {})",
                    max_of::<T>()
                ))
            })
            .and_then(Self::from_u64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        if !v.is_finite() || v.fract() != 0.0 {
            return Err(E::custom(format!(
                "invalid value: {v}, must be an integer (a whole number such as {})",
                v.trunc().max(0.0)
            )));
        }
        if !(0.0..=MAX_EXACT_F64).contains(&v) {
            return Err(E::custom(format!(
                "{v} is out of range (allowed: 0 to {})",
                max_of::<T>()
            )));
        }
        Self::from_u64(v as u64)
    }
}

struct OptionVisitor<T>(PhantomData<T>);

impl<'de, T: TryFrom<u64>> Visitor<'de> for OptionVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_any(IntegerVisitor(PhantomData)).map(Some)
    }
}

/// Deserialize an optional unsigned integer (`u8`, `u16`, `u32`, `u64`)
/// that may be written as an integral float (`64.0`); use with
/// `#[serde(default, deserialize_with = "easel_core::integer::option")]`.
///
/// # Errors
/// A fractional or non-finite number ("must be an integer"), a negative or
/// too large value (naming the range), or a value of another JSON type.
pub fn option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    deserializer.deserialize_option(OptionVisitor(PhantomData))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "super::option")]
        small: Option<u32>,
        #[serde(default, deserialize_with = "super::option")]
        big: Option<u64>,
    }

    fn parse(v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value::<T>(v).map_err(|e| e.to_string())
    }

    #[test]
    fn integral_floats_are_integers_and_fractions_are_refused() {
        let t = parse(json!({"small": 64.0, "big": 42.0})).unwrap();
        assert_eq!((t.small, t.big), (Some(64), Some(42)));
        let t = parse(json!({"small": 7, "big": null})).unwrap();
        assert_eq!((t.small, t.big), (Some(7), None));
        assert_eq!(parse(json!({})).unwrap().small, None);
        let e = parse(json!({"small": 64.5})).unwrap_err();
        assert!(e.contains("must be an integer"), "{e}");
        let e = parse(json!({"small": -1})).unwrap_err();
        assert!(e.contains("out of range (allowed: 0 to 4294967295)"), "{e}");
        let e = parse(json!({"small": 4294967296.0})).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = parse(json!({"big": -1.0})).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = parse(json!({"small": "64"})).unwrap_err();
        assert!(e.starts_with("invalid type"), "{e}");
    }
}
