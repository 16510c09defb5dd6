//! The audit log of one node: a record of every task it executed, written
//! before the result is returned, append-only and hash-chained. Each sealed
//! record names its sequence number and the hash of the record before it,
//! and its own hash covers both: an edited record fails its hash, a removed
//! or reordered one breaks the sequence or the chain.
//!
//! ```text
//!   seq 0: prev = 000…0, hash = H(seq, prev, record 0)
//!   seq 1: prev = hash 0, hash = H(seq, prev, record 1)      H = sha256 over
//!   seq 2: prev = hash 1, hash = H(seq, prev, record 2)      DOMAIN ‖ seq ‖ prev ‖ json(record)
//! ```
//!
//! What a chain alone cannot show: records cut off its end. The node's
//! head (last seq and hash) is published elsewhere for that.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Separates these hashes from any other sha256 of the same bytes.
const DOMAIN: &[u8] = b"agentmesh-audit-v1\0";
/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What one executed task leaves behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The task id (its idempotency key).
    pub task_id: String,
    /// The agent's name.
    pub agent: String,
    /// The agent's version.
    pub agent_version: String,
    /// The activation's epoch the task ran under.
    pub epoch: u64,
    /// sha256 of every model the task ran.
    pub models: Vec<String>,
    /// The node that ran it.
    pub node: String,
    /// Its region.
    pub region: String,
    /// The region policy's version (Raft log index) it was checked under.
    pub policy_version: u64,
    /// The dataset it read, if any.
    pub dataset: Option<String>,
    /// The data tags of the input and the dataset.
    pub tags: Vec<String>,
    /// sha256 of the input.
    pub input_sha256: String,
    /// sha256 of the output.
    pub output_sha256: String,
    /// The node the client sent the task to.
    pub entry_node: String,
    /// Nodes the task passed through before it ran.
    pub hops: u8,
    /// When it started and finished, Unix milliseconds.
    pub started_at_ms: u64,
    /// ..
    pub finished_at_ms: u64,
    /// The trace id.
    pub trace_id: String,
    /// Set when this run took over its task's claim (`NODE@EPOCH`, the
    /// claim it replaced: the agent's old host after a failover, or this
    /// host before it restarted). A run under that claim, if there was one,
    /// was never acknowledged and its effects were discarded with its state
    /// (see `mesh_task::checkpoint`); this run is the one that counts. Left
    /// out of the hashed JSON when unset, so older records verify as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaims: Option<String>,
    /// Set on the record of an agent's activation after its lease moved
    /// here, which is not a task: `REASON from NODE@EPOCH` (or `REASON`
    /// for a first placement). Its task id is `move/AGENT/EPOCH` (a `/`
    /// is never in a client's task id), its input hash is of the state
    /// version restored and its output hash of the replicas named. Left
    /// out of the hashed JSON when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<String>,
}

impl AuditRecord {
    /// Whether it records a task (not an agent's move).
    pub fn is_task(&self) -> bool {
        self.moved.is_none()
    }
}

/// A record in its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRecord {
    /// Its position, from 0, without gaps.
    pub seq: u64,
    /// The hash of the record before (or [`GENESIS`]).
    pub prev: String,
    /// Its own hash.
    pub hash: String,
    /// The record.
    pub record: AuditRecord,
}

/// Where a chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A record's contents do not match its hash.
    #[error("audit record {seq} was changed: its hash does not match its contents")]
    Edited {
        /// The record.
        seq: u64,
    },
    /// Records are missing or out of order.
    #[error(
        "audit record {found} follows record {expected_after}: records were removed or reordered"
    )]
    Gap {
        /// The sequence number expected before it.
        expected_after: u64,
        /// The one found.
        found: u64,
    },
    /// A record does not name the hash of the one before it.
    #[error("audit record {seq} does not follow the record before it (its prev hash differs)")]
    Broken {
        /// The record.
        seq: u64,
    },
}

/// The hash of a record at its place.
pub fn hash(seq: u64, prev: &str, record: &AuditRecord) -> String {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(prev.as_bytes());
    // Serializing a struct of strings and integers cannot fail.
    h.update(serde_json::to_vec(record).unwrap_or_default());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex sha256 of some bytes (inputs and outputs in audit records).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The end of a chain, where the next record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    last_hash: String,
}

impl Default for Chain {
    fn default() -> Self {
        Self {
            next_seq: 0,
            last_hash: GENESIS.to_owned(),
        }
    }
}

impl Chain {
    /// The chain that continues after `last` (None: an empty chain).
    pub fn after(last: Option<&SealedRecord>) -> Self {
        match last {
            None => Self::default(),
            Some(last) => Self {
                next_seq: last.seq.saturating_add(1),
                last_hash: last.hash.clone(),
            },
        }
    }

    /// Seals `record` as the next one and moves the end past it.
    pub fn append(&mut self, record: AuditRecord) -> SealedRecord {
        let seq = self.next_seq;
        let prev = std::mem::take(&mut self.last_hash);
        let hash = hash(seq, &prev, &record);
        self.next_seq = seq.saturating_add(1);
        self.last_hash = hash.clone();
        SealedRecord {
            seq,
            prev,
            hash,
            record,
        }
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Checks a whole chain, from its first record, in order; the first
/// problem found.
pub fn verify<'a>(records: impl IntoIterator<Item = &'a SealedRecord>) -> Result<u64, ChainError> {
    let mut expected = Chain::default();
    let mut count = 0;
    for sealed in records {
        if sealed.seq != expected.next_seq {
            return Err(ChainError::Gap {
                expected_after: expected.next_seq.wrapping_sub(1),
                found: sealed.seq,
            });
        }
        if hash(sealed.seq, &sealed.prev, &sealed.record) != sealed.hash {
            return Err(ChainError::Edited { seq: sealed.seq });
        }
        if sealed.prev != expected.last_hash {
            return Err(ChainError::Broken { seq: sealed.seq });
        }
        expected = Chain::after(Some(sealed));
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(task: &str) -> AuditRecord {
        AuditRecord {
            reclaims: None,
            moved: None,
            task_id: task.into(),
            agent: "echo".into(),
            agent_version: "1".into(),
            epoch: 1,
            models: vec![],
            node: "n1".into(),
            region: "eu-west".into(),
            policy_version: 7,
            dataset: None,
            tags: vec![],
            input_sha256: sha256_hex(b"in"),
            output_sha256: sha256_hex(b"out"),
            entry_node: "n2".into(),
            hops: 1,
            started_at_ms: 1,
            finished_at_ms: 2,
            trace_id: "t".into(),
        }
    }

    fn chain(n: usize) -> Vec<SealedRecord> {
        let mut c = Chain::default();
        (0..n)
            .map(|i| c.append(record(&format!("task-{i}"))))
            .collect()
    }

    #[test]
    fn a_chain_verifies_and_resumes_where_it_ended() {
        let mut records = chain(3);
        assert_eq!(verify(&records), Ok(3));
        let mut resumed = Chain::after(records.last());
        records.push(resumed.append(record("task-3")));
        assert_eq!(verify(&records), Ok(4));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn an_edited_record_is_detected() {
        let mut records = chain(4);
        records[2].record.output_sha256 = sha256_hex(b"forged");
        assert_eq!(verify(&records), Err(ChainError::Edited { seq: 2 }));
    }

    #[test]
    fn a_removed_record_is_detected() {
        let mut records = chain(4);
        records.remove(1);
        assert_eq!(
            verify(&records),
            Err(ChainError::Gap {
                expected_after: 0,
                found: 2
            })
        );
    }

    #[test]
    fn reordered_or_renumbered_records_are_detected() {
        let mut records = chain(4);
        records.swap(1, 2);
        assert!(matches!(verify(&records), Err(ChainError::Gap { .. })));
        // Renumbered to hide a removal, and rehashed: the chain breaks.
        let mut records = chain(4);
        records.remove(1);
        records[1].seq = 1;
        records[1].hash = hash(1, &records[1].prev, &records[1].record);
        assert_eq!(verify(&records), Err(ChainError::Broken { seq: 1 }));
    }
}
