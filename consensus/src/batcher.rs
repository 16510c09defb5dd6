//! Group commit for policy writes.
//!
//! openraft 0.9 handles each `client_write` on its own in its core task:
//! append one entry, wait for its fsync, then replicate it. One fsync per
//! write caps a region at about 1/fsync writes per second (5,000/s on a
//! 0.2 ms disk), however many clients wait. So writes that wait together
//! are proposed together, as one `RegionCommand::SetPolicies` entry: one
//! append, one fsync on each replica, one replication round for all of them.
//!
//! ```text
//!   set_policy ──try_send──> queue (bounded: full = Busy, retryable)
//!                              │ proposer: take one, then whatever else waits
//!                              ▼ (≤ MAX_BATCH writes, ≤ MAX_BATCH_BYTES)
//!                 Raft::client_write(SetPolicies([p1, p2, …]))   ≤ MAX_IN_FLIGHT at once
//!                              │ applied at log index V
//!                              ▼
//!   every writer of the batch: version V; all but the last: superseded
//! ```
//!
//! The writes of one batch were all in flight at once, so any order among
//! them is a linearizable one: they take effect in arrival order, at one
//! log index, and the last one is the policy in force at that version. A
//! writer whose policy was replaced within its own batch is told so
//! (`superseded`). A lone writer never waits for a batch to fill: the
//! proposer sends at once what is queued.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_types::policy::Policy;
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::group::{write_error, GroupError};
use crate::types::{RegionCommand, RegionResponse, TypeConfig};

/// Policy writes waiting for the proposer; more are refused as busy.
const QUEUE: usize = 4096;
/// Writes in one entry at most.
const MAX_BATCH: usize = 256;
/// Encoded policy bytes in one entry at most (one policy alone may exceed
/// it). With openraft's `max_payload_entries` of 64 and the API's 64 KiB
/// body limit, an AppendEntries stays under mesh-net's 16 MiB frames.
const MAX_BATCH_BYTES: usize = 128 * 1024;
/// Batches proposed and not yet applied at once: while one replicates, the
/// next is appended.
const MAX_IN_FLIGHT: usize = 2;

/// Where one write ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyApplied {
    /// The log index at which the write was applied.
    pub version: u64,
    /// A later write of the same batch replaced this policy at the same version.
    pub superseded: bool,
}

/// Where a queued write stands; the writer and the proposer race for it.
const QUEUED: u8 = 0;
const PROPOSED: u8 = 1;
const CANCELLED: u8 = 2;

struct Pending {
    policy: Policy,
    bytes: usize,
    reply: oneshot::Sender<Result<PolicyApplied, GroupError>>,
    /// QUEUED until the proposer takes it (PROPOSED) or its writer gives up
    /// first (CANCELLED: never proposed, so "not applied" is the truth).
    stage: Arc<AtomicU8>,
}

/// The sending side; the proposer task ends when every clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct PolicyWrites {
    tx: mpsc::Sender<Pending>,
    write_timeout: Duration,
}

impl PolicyWrites {
    /// Starts the proposer for `raft`. Needs a tokio runtime.
    pub(crate) fn start(raft: Raft<TypeConfig>, write_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(propose(raft, rx, write_timeout));
        Self { tx, write_timeout }
    }

    /// Queues `policy` and waits until it is applied, at most the write timeout.
    pub(crate) async fn write(&self, policy: Policy) -> Result<PolicyApplied, GroupError> {
        let bytes = crate::codec::encode(&policy)
            .map_err(|e| GroupError::Raft(format!("policy does not encode: {e}")))?
            .len();
        let (reply, answer) = oneshot::channel();
        let stage = Arc::new(AtomicU8::new(QUEUED));
        let pending = Pending {
            policy,
            bytes,
            reply,
            stage: stage.clone(),
        };
        self.tx.try_send(pending).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => GroupError::Busy(QUEUE),
            mpsc::error::TrySendError::Closed(_) => {
                GroupError::Raft("the group is shut down".into())
            }
        })?;
        match tokio::time::timeout(self.write_timeout, answer).await {
            // Still queued: cancel it, and it was never applied. Proposed
            // already: it may commit later.
            Err(_) => {
                match stage.compare_exchange(QUEUED, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => Err(GroupError::Timeout(self.write_timeout)),
                    Err(_) => Err(GroupError::OutcomeUnknown(self.write_timeout)),
                }
            }
            Ok(Err(_)) => Err(GroupError::Raft("the group is shut down".into())),
            Ok(Ok(result)) => result,
        }
    }
}

async fn propose(raft: Raft<TypeConfig>, mut rx: mpsc::Receiver<Pending>, write_timeout: Duration) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        // Take the permit first: while batches are in flight, writes gather.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // A write whose writer gave up while it waited here is dropped:
        // its writer was told it was not applied.
        let take = |p: &Pending| {
            p.stage
                .compare_exchange(QUEUED, PROPOSED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        };
        if !take(&first) {
            continue;
        }
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    if take(&p) {
                        bytes += p.bytes;
                        batch.push(p);
                    }
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (policies, replies): (Vec<Policy>, Vec<_>) =
                batch.into_iter().map(|p| (p.policy, p.reply)).unzip();
            let write = raft.client_write(RegionCommand::SetPolicies(policies));
            let result = match tokio::time::timeout(write_timeout, write).await {
                // Proposed: it may still commit.
                Err(_) => Err(GroupError::OutcomeUnknown(write_timeout)),
                Ok(Ok(response)) => match response.data {
                    RegionResponse::PolicySet { version } => Ok(version),
                    other => Err(GroupError::Raft(format!(
                        "policy write applied as another entry: {other:?}"
                    ))),
                },
                Ok(Err(e)) => Err(write_error(&raft, e)),
            };
            drop(permit);
            let last = replies.len() - 1;
            for (i, reply) in replies.into_iter().enumerate() {
                // A writer that gave up (timed out) no longer listens: fine.
                let _ = reply.send(result.clone().map(|version| PolicyApplied {
                    version,
                    superseded: i < last,
                }));
            }
        });
    }
}
