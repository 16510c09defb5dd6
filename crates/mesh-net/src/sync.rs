//! The member-sync message: signed records with their age, exchanged when
//! two nodes connect. Wire form: bincode 2 of [`SyncMessage`], whose first
//! field is a format version.

use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u8 = 1;

/// One member's freshest signed record and how long ago the sender got it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEntry {
    /// A sealed record (see [`crate::envelope`]); checked by the receiver.
    pub envelope: Vec<u8>,
    /// Milliseconds since the sender received it (0 for its own record).
    pub age_ms: u64,
}

/// A request carries the sender's own record; a response its whole live view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMessage {
    format: u8,
    /// The records.
    pub entries: Vec<SyncEntry>,
}

/// Why a sync message was refused.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Not a sync message.
    #[error("malformed member sync: {0}")]
    Malformed(String),
    /// A format this build does not read.
    #[error("member sync format {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnknownFormat(u8),
}

impl SyncMessage {
    /// A message of the current format.
    pub fn new(entries: Vec<SyncEntry>) -> Self {
        Self {
            format: FORMAT_VERSION,
            entries,
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain vectors and integers into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    /// Decodes and checks the format, claiming at most a frame's worth of
    /// bytes (bincode allocates from a length prefix before it reads).
    pub fn decode(bytes: &[u8]) -> Result<Self, SyncError> {
        let (message, _): (Self, usize) = bincode::serde::decode_from_slice(
            bytes,
            bincode::config::standard().with_limit::<{ crate::codec::FRAME_LEN_MAX }>(),
        )
        .map_err(|e| SyncError::Malformed(e.to_string()))?;
        if message.format != FORMAT_VERSION {
            return Err(SyncError::UnknownFormat(message.format));
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_formats() {
        let message = SyncMessage::new(vec![SyncEntry {
            envelope: vec![1, 2, 3],
            age_ms: 42,
        }]);
        assert_eq!(
            SyncMessage::decode(&message.encode()).expect("decode"),
            message
        );
        let mut future = message.clone();
        future.format = 9;
        assert!(matches!(
            SyncMessage::decode(&future.encode()),
            Err(SyncError::UnknownFormat(9))
        ));
        assert!(SyncMessage::decode(b"\xff\xff").is_err());
    }
}
