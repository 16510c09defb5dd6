//! Tasks on their host (issue 13), the part with IO: the checks a host
//! makes, the claim that fences a task to its agent's lease and runs a
//! task id once in its region, the agent kinds behind one trait, the
//! audit record and result written in one synced batch; and the leader's
//! placement round. The node runs this over libp2p and rocksdb, the
//! simulator over its simulated links and disk, with a fast deterministic
//! model runner.
//!
//! ```text
//!   entry node ──(libp2p)──> host: Host::execute(env, state, run, epoch)
//!        lease/epoch ─ residency ─ models ─ once per id ─ rate ─ claim (Raft) ─ kind ─ record
//!   leader: placement::round(state, members) ──> GrantLease commands (epoch + 1)
//! ```

pub mod checkpoint;
pub mod documents;
mod error;
#[cfg(test)]
mod failover_tests;
pub mod host;
pub mod kinds;
pub mod lease;
pub mod placement;
mod types;

pub use checkpoint::Replicas;
pub use error::TaskError;
pub use host::{check_policy, Claimer, Env, Host, Io, Kept};
pub use kinds::{Agent, Context, Models};
pub use types::{is_task_id, TaskAnswer, TaskRequest, TaskRun, TASK_ID_MAX};
