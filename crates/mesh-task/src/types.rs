//! What a task is on the wire: the client's request, the run that goes to
//! the host, and the answer that comes back.

use std::collections::BTreeMap;

use mesh_agent::SealedRecord;
use serde::{Deserialize, Serialize};

/// `POST /v1/tasks`: what a client submits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The agent.
    pub agent: String,
    /// The input text.
    pub input: String,
    /// Data tags of the input (residency rules apply to each).
    #[serde(default)]
    pub tags: Vec<String>,
    /// A conversation, for agents that remember one.
    #[serde(default)]
    pub session: Option<String>,
    /// The idempotency key; one is made when none is given.
    #[serde(default)]
    pub task_id: Option<String>,
    /// Stream generated text as it comes (server-sent events), then the
    /// answer.
    #[serde(default)]
    pub stream: bool,
}

/// A task on its way to its host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRun {
    /// The request, its task id filled in.
    pub request: TaskRequest,
    /// The node the client sent it to.
    pub entry_node: String,
    /// That node's region: where the result goes back to.
    pub entry_region: String,
    /// The trace id.
    pub trace_id: String,
}

/// What a task returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskAnswer {
    /// The task id.
    pub task_id: String,
    /// The agent.
    pub agent: String,
    /// The agent's output.
    pub output: serde_json::Value,
    /// Whether the task met the agent's latency budget on its host.
    pub met_budget: bool,
    /// How long it ran on its host, in milliseconds.
    pub millis: u64,
    /// Where the host's time went, by stage (`embed`, `search`,
    /// `generate`, `claim`, `record`), in milliseconds.
    #[serde(default)]
    pub stages_ms: BTreeMap<String, f64>,
    /// True when this is a stored result of an earlier submission.
    #[serde(default)]
    pub replayed: bool,
    /// The audit record the host wrote before answering.
    pub provenance: SealedRecord,
}

/// Longest task id.
pub const TASK_ID_MAX: usize = 128;

/// Whether `id` is a task id a client may give: 1 to [`TASK_ID_MAX`]
/// letters, digits and `- _ . :` (a result is stored under its task id, so
/// no id can name another key of the store).
pub fn is_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= TASK_ID_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}
