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

/// Checks the version byte, then decodes, claiming at most [`DECODE_LIMIT`] bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => bincode::serde::decode_from_slice(
            body,
            bincode::config::standard().with_limit::<DECODE_LIMIT>(),
        )
        .map(|(v, _)| v)
        .map_err(|e| CodecError::Decode(e.to_string())),
        other => Err(CodecError::Version {
            found: other.map(|(v, _)| *v),
        }),
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
