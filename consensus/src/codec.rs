//! How consensus values are persisted: one format-version byte, then
//! bincode 2 (standard config) of the value. A value with an unknown version
//! is an error, never silently misread.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format of every value this crate writes.
pub const FORMAT_VERSION: u8 = 1;

/// Why a persisted value could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value is empty or its version is not one this build reads.
    #[error("persisted value has format version {found:?}, this build reads {FORMAT_VERSION}")]
    Version {
        /// The version byte found, if any.
        found: Option<u8>,
    },
    /// bincode refused the bytes.
    #[error("persisted value does not decode: {0}")]
    Decode(String),
    /// bincode refused the value.
    #[error("value does not encode: {0}")]
    Encode(String),
}

/// Version byte + bincode.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_VERSION];
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Most bytes one decode may claim (strings, vectors): bincode allocates a
/// container from its length prefix before it reads the bytes, so without a
/// limit a 40-byte frame claiming a 2^46-byte string aborted the process
/// (issue 12). The largest legitimate value is a Raft RPC (mesh-net frames
/// are at most 16 MiB) or a stored snapshot of the region state, far below.
pub const DECODE_LIMIT: usize = 64 * 1024 * 1024;

/// Deepest nesting of values one decode may have. bincode has no depth
/// limit, and openraft's errors nest (an `AnyError` has an optional
/// `AnyError` source): a Raft reply of 5 MB nesting a million of them
/// overflowed the stack of the task decoding it (issue 12; found while
/// writing the raft_rpc fuzz target, which cannot reach such depths). The
/// deepest legitimate value (a batch of policies in an AppendEntries, an
/// error with its chain of sources) nests about 25 deep.
pub const DEPTH_MAX: usize = 64;

/// Checks the version byte, then decodes, claiming at most [`DECODE_LIMIT`]
/// bytes and nesting at most [`DEPTH_MAX`] deep.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            let mut decoder = bincode::serde::BorrowedSerdeDecoder::from_slice(
                body,
                bincode::config::standard().with_limit::<DECODE_LIMIT>(),
                (),
            );
            T::deserialize(depth::Limited::new(decoder.as_deserializer(), DEPTH_MAX))
                .map_err(|e| CodecError::Decode(e.to_string()))
        }
        other => Err(CodecError::Version {
            found: other.map(|(v, _)| *v),
        }),
    }
}

/// A serde `Deserializer` that refuses values nested deeper than a limit:
/// every value read costs one level, and the levels left travel down into
/// the sequences, maps, options and enums a visitor reads.
mod depth {
    use serde::de::{
        self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess,
        Visitor,
    };

    /// The wrapped deserializer and how many levels it may still descend.
    pub(super) struct Limited<D> {
        inner: D,
        left: usize,
    }

    impl<D> Limited<D> {
        pub(super) fn new(inner: D, left: usize) -> Self {
            Self { inner, left }
        }
    }

    fn too_deep<E: de::Error>() -> E {
        E::custom(format_args!(
            "values nested more than {} deep",
            super::DEPTH_MAX
        ))
    }

    macro_rules! descend {
        ($($method:ident),* $(,)?) => {$(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
                self.inner.$method(Wrap { inner: visitor, left })
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<D> {
        type Error = D::Error;

        descend!(
            deserialize_any,
            deserialize_bool,
            deserialize_i8,
            deserialize_i16,
            deserialize_i32,
            deserialize_i64,
            deserialize_i128,
            deserialize_u8,
            deserialize_u16,
            deserialize_u32,
            deserialize_u64,
            deserialize_u128,
            deserialize_f32,
            deserialize_f64,
            deserialize_char,
            deserialize_str,
            deserialize_string,
            deserialize_bytes,
            deserialize_byte_buf,
            deserialize_option,
            deserialize_unit,
            deserialize_seq,
            deserialize_map,
            deserialize_identifier,
            deserialize_ignored_any,
        );

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
            self.inner.deserialize_unit_struct(
                name,
                Wrap {
                    inner: visitor,
                    left,
                },
            )
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
            self.inner.deserialize_newtype_struct(
                name,
                Wrap {
                    inner: visitor,
                    left,
                },
            )
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
            self.inner.deserialize_tuple(
                len,
                Wrap {
                    inner: visitor,
                    left,
                },
            )
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
            self.inner.deserialize_tuple_struct(
                name,
                len,
                Wrap {
                    inner: visitor,
                    left,
                },
            )
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
            self.inner.deserialize_struct(
                name,
                fields,
                Wrap {
                    inner: visitor,
                    left,
                },
            )
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            let left = self.left.checked_sub(1).ok_or_else(too_deep::<D::Error>)?;
            self.inner.deserialize_enum(
                name,
                variants,
                Wrap {
                    inner: visitor,
                    left,
                },
            )
        }

        fn is_human_readable(&self) -> bool {
            self.inner.is_human_readable()
        }
    }

    /// A visitor, sequence, map, enum or variant access, or seed, that hands
    /// the levels left to whatever it deserializes next.
    struct Wrap<T> {
        inner: T,
        left: usize,
    }

    macro_rules! visit_value {
        ($($method:ident: $ty:ty),* $(,)?) => {$(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.inner.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.inner.expecting(f)
        }

        visit_value!(
            visit_bool: bool, visit_i8: i8, visit_i16: i16, visit_i32: i32, visit_i64: i64,
            visit_i128: i128, visit_u8: u8, visit_u16: u16, visit_u32: u32, visit_u64: u64,
            visit_u128: u128, visit_f32: f32, visit_f64: f64, visit_char: char,
            visit_str: &str, visit_borrowed_str: &'de str, visit_string: String,
            visit_bytes: &[u8], visit_borrowed_bytes: &'de [u8], visit_byte_buf: Vec<u8>,
        );

        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_none()
        }

        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_unit()
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.inner.visit_some(Limited::new(d, self.left))
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.inner.visit_newtype_struct(Limited::new(d, self.left))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
            self.inner.visit_seq(Wrap {
                inner: seq,
                left: self.left,
            })
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.inner.visit_map(Wrap {
                inner: map,
                left: self.left,
            })
        }

        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
            self.inner.visit_enum(Wrap {
                inner: data,
                left: self.left,
            })
        }
    }

    impl<'de, T: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<T> {
        type Value = T::Value;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T::Value, D::Error> {
            self.inner.deserialize(Limited::new(d, self.left))
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<A> {
        type Error = A::Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            self.inner.next_element_seed(Wrap {
                inner: seed,
                left: self.left,
            })
        }

        fn size_hint(&self) -> Option<usize> {
            self.inner.size_hint()
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            self.inner.next_key_seed(Wrap {
                inner: seed,
                left: self.left,
            })
        }

        fn next_value_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            self.inner.next_value_seed(Wrap {
                inner: seed,
                left: self.left,
            })
        }

        fn size_hint(&self) -> Option<usize> {
            self.inner.size_hint()
        }
    }

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Wrap<A> {
        type Error = A::Error;
        type Variant = Wrap<A::Variant>;

        fn variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<(T::Value, Wrap<A::Variant>), A::Error> {
            let left = self.left;
            self.inner
                .variant_seed(Wrap { inner: seed, left })
                .map(|(value, variant)| {
                    (
                        value,
                        Wrap {
                            inner: variant,
                            left,
                        },
                    )
                })
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Wrap<A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            self.inner.unit_variant()
        }

        fn newtype_variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            self.inner.newtype_variant_seed(Wrap {
                inner: seed,
                left: self.left,
            })
        }

        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.tuple_variant(
                len,
                Wrap {
                    inner: visitor,
                    left: self.left,
                },
            )
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.struct_variant(
                fields,
                Wrap {
                    inner: visitor,
                    left: self.left,
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 12, finding 1): a frame of a few dozen bytes whose
    /// string length prefix claims 2^46 bytes is an error, not an abort
    /// ("memory allocation of 70368744177664 bytes failed").
    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_abort() {
        let mut bytes = encode(&(7u64, "QQQQ".to_string())).expect("encode");
        let at = bytes
            .windows(5)
            .position(|w| w == b"\x04QQQQ")
            .expect("the string's length prefix");
        // bincode's varint: 0xFD then a u64, little-endian.
        let mut huge = vec![0xFD];
        huge.extend_from_slice(&(1u64 << 46).to_le_bytes());
        bytes.splice(at..at + 5, huge);
        assert!(bytes.len() < 40);
        let decoded = decode::<(u64, String)>(&bytes);
        assert!(matches!(decoded, Err(CodecError::Decode(_))), "{decoded:?}");
    }

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let bytes = encode(&(7u64, "x".to_string())).expect("encode");
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(
            decode::<(u64, String)>(&bytes).expect("decode"),
            (7, "x".into())
        );
        let mut future = bytes.clone();
        future[0] = 2;
        assert!(matches!(
            decode::<(u64, String)>(&future),
            Err(CodecError::Version { found: Some(2) })
        ));
        assert!(matches!(
            decode::<u64>(&[]),
            Err(CodecError::Version { found: None })
        ));
    }
}
