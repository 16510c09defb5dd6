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

/// Checks the version byte, then decodes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|e| CodecError::Decode(e.to_string()))
        }
        other => Err(CodecError::Version {
            found: other.map(|(v, _)| *v),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
