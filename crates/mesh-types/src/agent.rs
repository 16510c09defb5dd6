//! Agent manifests as written in `agent.toml` (examples in
//! `examples/agents/`). Parsing and checking are in `mesh-agent`.

use serde::{Deserialize, Serialize};

use crate::Region;

/// Most tasks one activation runs at once.
pub const CONCURRENCY_MAX: u32 = 256;
/// Longest agent name; names are lowercase letters, digits and '-'.
pub const NAME_MAX: usize = 64;

/// The built-in kinds. A kind hosted in WebAssembly would be one more
/// variant here; routing and placement do not look at the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// Returns its input: measures the mesh itself.
    Echo,
    /// Returns the embedding of its input.
    Embed,
    /// Chat completion, with conversation memory per session.
    Generate,
    /// Semantic search over its dataset: the top-k documents with scores.
    Search,
    /// Search, then generate an answer that cites the documents used.
    Rag,
    /// A number per key, kept as agent state: each task adds to it and
    /// returns the new value (lost or doubled work shows in it). Last, so
    /// stored manifests of the kinds before still decode.
    Counter,
}

impl AgentKind {
    /// Every kind, for error messages.
    pub const ALL: [AgentKind; 6] = [
        AgentKind::Echo,
        AgentKind::Embed,
        AgentKind::Generate,
        AgentKind::Search,
        AgentKind::Rag,
        AgentKind::Counter,
    ];

    /// Its name in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Echo => "echo",
            AgentKind::Embed => "embed",
            AgentKind::Generate => "generate",
            AgentKind::Search => "search",
            AgentKind::Rag => "rag",
            AgentKind::Counter => "counter",
        }
    }

    /// Needs an embedding model.
    pub fn embeds(self) -> bool {
        matches!(self, AgentKind::Embed | AgentKind::Search | AgentKind::Rag)
    }

    /// Needs a generation model.
    pub fn generates(self) -> bool {
        matches!(self, AgentKind::Generate | AgentKind::Rag)
    }

    /// Works on a dataset.
    pub fn needs_dataset(self) -> bool {
        matches!(self, AgentKind::Search | AgentKind::Rag)
    }
}

/// A model an agent uses, by registry name and the sha256 of its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Registry name, e.g. `all-minilm-l6-v2`.
    pub name: String,
    /// Lowercase hex sha256 of the weights.
    pub sha256: String,
}

/// An agent manifest as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique in a region: lowercase letters, digits and '-'.
    pub name: String,
    /// Free text, e.g. `1.0.0`; recorded with every task.
    pub version: String,
    /// What it does.
    pub kind: AgentKind,
    /// The models it runs.
    #[serde(default)]
    pub models: Vec<ModelRef>,
    /// The dataset it works on (`search`, `rag`).
    #[serde(default)]
    pub dataset: Option<String>,
    /// Regions where it may run; never empty.
    pub regions: Vec<Region>,
    /// Tasks one activation runs at once. Default 4.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// A task should be answered within this; every result says whether it was.
    pub latency_budget_ms: u64,
}

fn default_concurrency() -> u32 {
    4
}
