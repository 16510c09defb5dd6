//! The agent interface and the built-in kinds. A kind gets its input, its
//! state (the conversation of its session), the node's models and its
//! dataset's documents through [`Context`], and returns its output; it
//! never sees routing, placement or the audit log, so a kind hosted in
//! WebAssembly can be added as one more [`Agent`] without changing them.

use std::collections::BTreeMap;

use async_trait::async_trait;
use consensus::Dataset;
use mesh_store::Store;
use mesh_types::agent::{AgentKind, Manifest};
use tokio::time::Instant;

use crate::documents::{self, Hit};
use crate::TaskError;

/// Documents a search returns.
pub const SEARCH_TOP_K: usize = 5;
/// Documents a rag answer is given.
pub const RAG_DOCUMENTS: usize = 3;

/// A conversation: (user, assistant) turns, oldest first.
pub type Turns = Vec<(String, String)>;

/// Where a streamed task's generated text goes, piece by piece, as it is
/// generated.
pub type TokenSink = dyn Fn(&str) + Send + Sync;

/// The node's models, as a kind uses them.
#[async_trait]
pub trait Models: Send + Sync {
    /// The embedding of `text` by the node's embedding model.
    async fn embed(&self, text: &str) -> Result<Vec<f32>, TaskError>;
    /// A completion of `prompt` (a chat prompt, see [`chat`]) by the node's
    /// generation model; each piece also goes to `tokens` as it comes.
    async fn generate(
        &self,
        prompt: String,
        tokens: Option<&TokenSink>,
    ) -> Result<String, TaskError>;
}

/// What a kind works with.
pub struct Context<'a> {
    /// The agent's manifest.
    pub manifest: &'a Manifest,
    /// The task's input.
    pub input: &'a str,
    /// The agent's dataset, as the region registered it.
    pub dataset: Option<&'a Dataset>,
    /// This node's peer id.
    pub node: &'a str,
    /// This node's region.
    pub region: &'a str,
    /// This node's store (the dataset's documents).
    pub store: &'a dyn Store,
    /// This node's models.
    pub models: &'a dyn Models,
    /// The session's earlier turns (the agent's state), oldest first.
    pub history: &'a [(String, String)],
    /// Set by a kind that remembers: this task's answer, kept as the
    /// session's next turn in the same batch as the task's audit record.
    pub remember: Option<String>,
    /// Where the time went, by stage, in milliseconds.
    pub stages_ms: BTreeMap<String, f64>,
    /// A streamed task's generated pieces go here.
    pub tokens: Option<&'a TokenSink>,
    /// The epoch of the lease the task runs under (state is tagged with it).
    pub epoch: u64,
    /// Set by a kind with state: (key, value) pairs of `Column::Tasks`,
    /// written in the same synced batch as the task's audit record.
    pub state_writes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("agent", &self.manifest.name)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Context<'_> {
    fn timed(&mut self, stage: &str, since: Instant) {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        *self.stages_ms.entry(stage.to_owned()).or_default() += ms;
    }

    async fn embed(&mut self, text: &str) -> Result<Vec<f32>, TaskError> {
        let started = Instant::now();
        let vector = self.models.embed(text).await;
        self.timed("embed", started);
        vector
    }

    async fn generate(&mut self, prompt: String) -> Result<String, TaskError> {
        let started = Instant::now();
        let text = self.models.generate(prompt, self.tokens).await;
        self.timed("generate", started);
        text
    }

    /// The `k` documents of the agent's dataset nearest the input: the
    /// dataset must be registered, and on this node (the agent moves to
    /// its data).
    async fn search(&mut self, k: usize) -> Result<Vec<Hit>, TaskError> {
        let dataset = self.dataset.ok_or_else(|| {
            TaskError::new(
                503,
                "dataset_not_registered",
                format!(
                    "dataset {:?} is not registered in region {} yet",
                    self.manifest.dataset, self.region
                ),
            )
        })?;
        if dataset.node != self.node {
            return Err(TaskError::new(
                409,
                "data_elsewhere",
                format!(
                    "dataset {} is on node {}; the agent is being moved there, retry shortly",
                    dataset.name, dataset.node
                ),
            ));
        }
        let query = self.embed(self.input).await?;
        let started = Instant::now();
        let hits = documents::search(self.store, &dataset.name, &query, k);
        self.timed("search", started);
        hits
    }
}

/// An agent kind: what it does with a task.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Runs one task; the output is returned and hashed into the audit record.
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError>;
}

/// `echo`: returns its input (it measures the mesh itself).
#[derive(Debug)]
pub struct Echo;
/// `embed`: returns the vector.
#[derive(Debug)]
pub struct Embed;
/// `generate`: chat completion, with the session's turns as memory.
#[derive(Debug)]
pub struct Generate;
/// `search`: top-k documents of its dataset, with scores.
#[derive(Debug)]
pub struct Search;
/// `rag`: search, then an answer that cites the documents it used.
#[derive(Debug)]
pub struct Rag;
/// `counter`: a number per key; a task `KEY` adds 1, `KEY +N` or `KEY -N`
/// adds N, and returns the new value.
#[derive(Debug)]
pub struct Counter;

/// Longest counter key.
pub const COUNTER_KEY_MAX: usize = 128;

/// A counter's value as it is stored: with the epoch it was written under.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct CounterValue {
    /// The number.
    pub value: i64,
    /// The lease epoch of the task that wrote it.
    pub epoch: u64,
}

/// Where counter `key` of `agent` is kept.
pub fn counter_key(agent: &str, key: &str) -> Vec<u8> {
    format!("counter\0{agent}\0{key}").into_bytes()
}

/// The built-in kind that runs `kind`.
pub fn builtin(kind: AgentKind) -> &'static dyn Agent {
    match kind {
        AgentKind::Echo => &Echo,
        AgentKind::Embed => &Embed,
        AgentKind::Generate => &Generate,
        AgentKind::Search => &Search,
        AgentKind::Rag => &Rag,
        AgentKind::Counter => &Counter,
    }
}

#[async_trait]
impl Agent for Echo {
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError> {
        Ok(serde_json::Value::String(cx.input.to_owned()))
    }
}

#[async_trait]
impl Agent for Embed {
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError> {
        let vector = cx.embed(cx.input).await?;
        Ok(serde_json::json!({ "dims": vector.len(), "vector": vector }))
    }
}

#[async_trait]
impl Agent for Generate {
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError> {
        let prompt = chat(cx.history, cx.input, None);
        let text = cx.generate(prompt).await?;
        cx.remember = Some(text.clone());
        Ok(serde_json::Value::String(text))
    }
}

#[async_trait]
impl Agent for Search {
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError> {
        let hits = cx.search(SEARCH_TOP_K).await?;
        Ok(serde_json::json!({ "hits": hits }))
    }
}

#[async_trait]
impl Agent for Rag {
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError> {
        let hits = cx.search(RAG_DOCUMENTS).await?;
        let context: String = hits
            .iter()
            .map(|h| format!("[{}] {}\n", h.id, h.text))
            .collect();
        let prompt = chat(&[], cx.input, Some(&context));
        let answer = cx.generate(prompt).await?;
        let mut cited: Vec<&str> = hits
            .iter()
            .map(|h| h.id.as_str())
            .filter(|id| answer.contains(&format!("[{id}]")) || answer.contains(id))
            .collect();
        // The model used what it was given: when it names none, the
        // documents it was given are its sources.
        if cited.is_empty() {
            cited = hits.iter().map(|h| h.id.as_str()).collect();
        }
        Ok(serde_json::json!({ "answer": answer, "cited": cited, "documents": hits }))
    }
}

#[async_trait]
impl Agent for Counter {
    async fn run(&self, cx: &mut Context<'_>) -> Result<serde_json::Value, TaskError> {
        let bad = |why: String| TaskError::new(400, "invalid_input", why);
        let mut words = cx.input.split_whitespace();
        let key = words
            .next()
            .ok_or_else(|| bad("a counter task is KEY, KEY +N or KEY -N".into()))?;
        if key.len() > COUNTER_KEY_MAX {
            return Err(bad(format!(
                "a counter key has at most {COUNTER_KEY_MAX} bytes"
            )));
        }
        let add: i64 = match words.next() {
            None => 1,
            Some(n) => n
                .strip_prefix('+')
                .unwrap_or(n)
                .parse()
                .map_err(|_| bad(format!("{n:?} is not a whole number to add")))?,
        };
        if words.next().is_some() {
            return Err(bad("a counter task is KEY, KEY +N or KEY -N".into()));
        }
        let at = counter_key(&cx.manifest.name, key);
        let now = match cx
            .store
            .get(mesh_store::Column::Tasks, &at)
            .map_err(|e| TaskError::storage(format!("reading counter {key}: {e}")))?
        {
            None => 0,
            Some(bytes) => {
                serde_json::from_slice::<CounterValue>(&bytes)
                    .map_err(|e| TaskError::storage(format!("counter {key} is unreadable: {e}")))?
                    .value
            }
        };
        let value = now.checked_add(add).ok_or_else(|| {
            bad(format!(
                "counter {key} would pass the range of a 64-bit number"
            ))
        })?;
        let stored = CounterValue {
            value,
            epoch: cx.epoch,
        };
        cx.state_writes.push((
            at,
            serde_json::to_vec(&stored).map_err(|e| TaskError::storage(e.to_string()))?,
        ));
        Ok(serde_json::json!({ "key": key, "value": value }))
    }
}

/// A chat prompt (SmolLM2's template) with earlier turns and, for rag, the
/// documents to answer from.
pub fn chat(history: &[(String, String)], user: &str, documents: Option<&str>) -> String {
    let system = match documents {
        None => "You are a helpful assistant. Answer briefly.".to_owned(),
        Some(docs) => format!(
            "Answer the question using only these documents, and cite the ones you use by their id in brackets, like [hr-1].\n{docs}"
        ),
    };
    let mut prompt = format!("<|im_start|>system\n{system}<|im_end|>\n");
    for (question, answer) in history {
        prompt.push_str(&format!(
            "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        ));
    }
    prompt.push_str(&format!(
        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ));
    prompt
}
