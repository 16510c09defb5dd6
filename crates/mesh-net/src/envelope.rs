//! Signed node records on the wire.
//!
//! A record is signed by the node it describes, so any node can check it no
//! matter how many peers forwarded it. Wire form (bincode 2, standard config):
//! `Envelope { format, record, public_key, signature }` where `record` is the
//! bincode of the [`NodeRecord`] and the signature covers
//! `SIGNING_DOMAIN || record`.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use mesh_types::NodeRecord;
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u8 = 1;
/// Domain separation: a signature over a record can never be reused as a
/// signature over anything else the key signs.
const SIGNING_DOMAIN: &[u8] = b"agentmesh/node-record/1:";

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u8,
    record: Vec<u8>,
    public_key: Vec<u8>,
    signature: Vec<u8>,
}

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not an envelope or a record.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// An envelope of a format this build does not know.
    #[error("record format {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnknownFormat(u8),
    /// The signature does not verify.
    #[error("record signature does not verify")]
    BadSignature,
    /// The record names a node other than the key that signed it.
    #[error("record claims node {claimed} but is signed by {signer}")]
    WrongSigner {
        /// The `node_id` in the record.
        claimed: String,
        /// The peer id of the signing key.
        signer: String,
    },
    /// Signing failed (the key cannot sign).
    #[error("cannot sign record: {0}")]
    Signing(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Most bytes decoding one envelope may claim: a signed node record (a few
/// hundred bytes; many addresses and models stay far below this). bincode
/// allocates from a length prefix before it reads; the limit stops a
/// crafted record from claiming terabytes (issue 12).
pub const ENVELOPE_DECODE_LIMIT: usize = 256 * 1024;

/// Most addresses one record may list: a node on 0.0.0.0 lists every
/// interface's address, twice (TCP and QUIC); a host with many bridges
/// stays well below this.
pub const RECORD_ADDRS_MAX: usize = 128;
/// Most models, and most datasets, one record may list.
pub const RECORD_ITEMS_MAX: usize = 256;
/// Longest string in a record (an address, a name, a hash, a version).
pub const RECORD_STRING_MAX: usize = 256;

/// Refuses a record past its limits (issue 12, finding 5): every member
/// keeps every record, so one inflated record costs every node.
fn check_limits(record: &NodeRecord) -> Result<(), EnvelopeError> {
    let too_long = |what: &str, s: &str| -> Result<(), EnvelopeError> {
        if s.len() > RECORD_STRING_MAX {
            return Err(EnvelopeError::Malformed(format!(
                "record's {what} is {} bytes, over the limit of {RECORD_STRING_MAX}",
                s.len()
            )));
        }
        Ok(())
    };
    if record.addrs.len() > RECORD_ADDRS_MAX {
        return Err(EnvelopeError::Malformed(format!(
            "record lists {} addresses, over the limit of {RECORD_ADDRS_MAX}",
            record.addrs.len()
        )));
    }
    if record.models.len() > RECORD_ITEMS_MAX || record.datasets.len() > RECORD_ITEMS_MAX {
        return Err(EnvelopeError::Malformed(format!(
            "record lists {} models and {} datasets, over the limit of {RECORD_ITEMS_MAX} each",
            record.models.len(),
            record.datasets.len()
        )));
    }
    too_long("version", &record.version)?;
    for a in &record.addrs {
        too_long("address", a)?;
    }
    for m in &record.models {
        too_long("model name", &m.name)?;
        too_long("model hash", &m.sha256)?;
    }
    for d in &record.datasets {
        too_long("dataset name", d)?;
    }
    if let Some(api) = &record.api {
        too_long("API address", api)?;
    }
    Ok(())
}

/// Signs `record` with `keypair`. The caller MUST only seal its own record.
pub fn seal(keypair: &Keypair, record: &NodeRecord) -> Result<Vec<u8>, EnvelopeError> {
    let record_bytes = bincode::serde::encode_to_vec(record, config())
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    let signature = keypair
        .sign(&[SIGNING_DOMAIN, &record_bytes].concat())
        .map_err(|e| EnvelopeError::Signing(e.to_string()))?;
    let envelope = Envelope {
        format: FORMAT_VERSION,
        record: record_bytes,
        public_key: keypair.public().encode_protobuf(),
        signature,
    };
    bincode::serde::encode_to_vec(&envelope, config())
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))
}

/// Decodes and checks an envelope; returns the record and the signer.
pub fn open(bytes: &[u8]) -> Result<(NodeRecord, PeerId), EnvelopeError> {
    let (envelope, _): (Envelope, usize) =
        bincode::serde::decode_from_slice(bytes, config().with_limit::<ENVELOPE_DECODE_LIMIT>())
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if envelope.format != FORMAT_VERSION {
        return Err(EnvelopeError::UnknownFormat(envelope.format));
    }
    let public_key = PublicKey::try_decode_protobuf(&envelope.public_key)
        .map_err(|e| EnvelopeError::Malformed(format!("public key: {e}")))?;
    if !public_key.verify(
        &[SIGNING_DOMAIN, &envelope.record].concat(),
        &envelope.signature,
    ) {
        return Err(EnvelopeError::BadSignature);
    }
    // Signed by a key made on the spot is enough to get here: still bounded.
    let (record, _): (NodeRecord, usize) = bincode::serde::decode_from_slice(
        &envelope.record,
        config().with_limit::<ENVELOPE_DECODE_LIMIT>(),
    )
    .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    check_limits(&record)?;
    let signer = public_key.to_peer_id();
    if record.node_id.0 != signer.to_base58() {
        return Err(EnvelopeError::WrongSigner {
            claimed: record.node_id.0,
            signer: signer.to_base58(),
        });
    }
    Ok((record, signer))
}

#[cfg(test)]
mod tests {
    use mesh_types::{Load, NodeId, Region};

    use super::*;

    fn record_of(keypair: &Keypair) -> NodeRecord {
        NodeRecord {
            node_id: NodeId(keypair.public().to_peer_id().to_base58()),
            region: Region::parse("eu-west").expect("valid"),
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            version: "test".into(),
            started_at_ms: 1,
            seq: 2,
            sent_at_ms: 3,
            leaving: false,
            models: vec![],
            datasets: vec![],
            load: Load::default(),
            api: None,
            raft: None,
        }
    }

    /// Regression (issue 12, finding 1): a record signed by a key made on
    /// the spot, whose version string claims 2^46 bytes, is refused as
    /// malformed instead of aborting the process.
    #[test]
    fn a_signed_record_with_a_huge_length_prefix_is_refused_not_an_abort() {
        let keypair = Keypair::generate_ed25519();
        let mut record = record_of(&keypair);
        record.version = "QQQQ".into();
        let mut bytes = bincode::serde::encode_to_vec(&record, config()).expect("encode");
        let at = bytes
            .windows(5)
            .position(|w| w == b"\x04QQQQ")
            .expect("the version's length prefix");
        let mut huge = vec![0xFD];
        huge.extend_from_slice(&(1u64 << 46).to_le_bytes());
        bytes.splice(at..at + 5, huge);
        let signature = keypair
            .sign(&[SIGNING_DOMAIN, &bytes].concat())
            .expect("sign");
        let envelope = Envelope {
            format: FORMAT_VERSION,
            record: bytes,
            public_key: keypair.public().encode_protobuf(),
            signature,
        };
        let wire = bincode::serde::encode_to_vec(&envelope, config()).expect("encode");
        assert!(matches!(open(&wire), Err(EnvelopeError::Malformed(_))));
    }

    /// Issue 12, finding 5 (part): a signed record past its limits (here
    /// 1,000 or 10,000 addresses, or one 1 KiB address) is refused.
    #[test]
    fn an_inflated_record_is_refused() {
        let keypair = Keypair::generate_ed25519();
        let mut record = record_of(&keypair);
        record.addrs = vec!["/ip4/127.0.0.1/tcp/1".into(); 1_000];
        let sealed = seal(&keypair, &record).expect("seal");
        assert!(
            matches!(open(&sealed), Err(EnvelopeError::Malformed(e)) if e.contains("1000 addresses"))
        );
        // Ten times more does not even decode (the decode limit).
        record.addrs = vec!["/ip4/127.0.0.1/tcp/1".into(); 10_000];
        let sealed = seal(&keypair, &record).expect("seal");
        assert!(matches!(open(&sealed), Err(EnvelopeError::Malformed(_))));
        let mut record = record_of(&keypair);
        record.addrs = vec!["x".repeat(1024)];
        let sealed = seal(&keypair, &record).expect("seal");
        assert!(
            matches!(open(&sealed), Err(EnvelopeError::Malformed(e)) if e.contains("address is 1024 bytes"))
        );
        // At the limits: fine.
        let mut record = record_of(&keypair);
        record.addrs = vec!["/ip4/127.0.0.1/tcp/1".into(); RECORD_ADDRS_MAX];
        open(&seal(&keypair, &record).expect("seal")).expect("at the limit");
    }

    #[test]
    fn a_sealed_record_opens_with_its_signer() {
        let keypair = Keypair::generate_ed25519();
        let record = record_of(&keypair);
        let (opened, signer) = open(&seal(&keypair, &record).expect("seal")).expect("open");
        assert_eq!(opened, record);
        assert_eq!(signer, keypair.public().to_peer_id());
    }

    #[test]
    fn a_record_about_another_node_is_refused() {
        let keypair = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let err = open(&seal(&keypair, &record_of(&other)).expect("seal")).expect_err("forged");
        assert!(matches!(err, EnvelopeError::WrongSigner { .. }));
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let keypair = Keypair::generate_ed25519();
        let sealed = seal(&keypair, &record_of(&keypair)).expect("seal");
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            assert!(open(&tampered).is_err(), "flip at byte {i} was accepted");
        }
    }
}
