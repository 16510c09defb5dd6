//! Inference off the async runtime: each loaded model gets its own worker
//! thread and a bounded queue. Embedding requests that wait together are
//! run as one batch (up to `max_batch` inputs, waiting at most `max_wait`
//! for more after the first). A full queue refuses the request at once with
//! a retryable error; nothing queues without bound. A request whose caller
//! went away while it waited is skipped, and a model that panics on an
//! input fails that request only: the worker catches it and goes on.
//!
//! ```text
//!   async caller ──try_send──> bounded queue ──> worker thread (owns the model)
//!        ▲                         full: Busy      embed: gather ≤ max_batch inputs / max_wait
//!        └──── oneshot / stream of text pieces ◄── generate: one request at a time, streamed
//! ```

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::generate::Params;
use crate::registry::ModelError;
use crate::{Embedder, Generator};

/// How a model is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// Inputs in one embedding batch at most.
    pub max_batch: usize,
    /// After the first request of a batch, wait at most this for more.
    pub max_wait: Duration,
    /// Requests waiting for the worker at most; more are refused.
    pub queue: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue: 64,
        }
    }
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The queue is full: retry later or on another node.
    #[error("model {0} is busy: its queue is full; retry shortly or on another node")]
    Busy(String),
    /// The worker has stopped.
    #[error("model {0} is not running")]
    Stopped(String),
    /// The model failed on this input.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl ServeError {
    /// True when the same request may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Busy(_))
    }
}

/// Something that embeds a batch of texts (the real [`Embedder`], or a test double).
pub trait EmbedBatch: Send + 'static {
    /// One vector per input, in order.
    fn embed_batch(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, ModelError>;
}

impl EmbedBatch for Embedder {
    fn embed_batch(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed(inputs)
    }
}

struct EmbedJob {
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>,
}

/// Counters of an embedding service, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batches run.
    pub batches: u64,
    /// Inputs embedded.
    pub inputs: u64,
    /// Largest batch, in inputs.
    pub largest: usize,
}

/// An embedding model behind its worker thread.
#[derive(Debug, Clone)]
pub struct EmbedService {
    name: String,
    tx: SyncSender<EmbedJob>,
    stats: std::sync::Arc<std::sync::Mutex<BatchStats>>,
}

impl EmbedService {
    /// Starts the worker thread that owns `model`.
    pub fn start(name: &str, model: impl EmbedBatch, config: ServeConfig) -> Self {
        let (tx, rx) = sync_channel(config.queue);
        let stats = std::sync::Arc::new(std::sync::Mutex::new(BatchStats::default()));
        let worker_stats = stats.clone();
        let thread_name = format!("embed-{name}");
        let spawned = std::thread::Builder::new().name(thread_name).spawn({
            let name = name.to_owned();
            move || embed_worker(&name, model, rx, config, worker_stats)
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an embedding worker thread");
        }
        Self {
            name: name.to_owned(),
            tx,
            stats,
        }
    }

    /// Embeds `inputs`; refused at once when the queue is full.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Vec<Vec<f32>>, ServeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(EmbedJob { inputs, reply })
            .map_err(|e| match e {
                TrySendError::Full(_) => ServeError::Busy(self.name.clone()),
                TrySendError::Disconnected(_) => ServeError::Stopped(self.name.clone()),
            })?;
        Ok(answer
            .await
            .map_err(|_| ServeError::Stopped(self.name.clone()))??)
    }

    /// Batches run so far.
    pub fn stats(&self) -> BatchStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// What a model's panic payload says, for the error its request gets.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

fn embed_worker(
    name: &str,
    model: impl EmbedBatch,
    rx: Receiver<EmbedJob>,
    config: ServeConfig,
    stats: std::sync::Arc<std::sync::Mutex<BatchStats>>,
) {
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + config.max_wait;
        let mut count = first.inputs.len();
        let mut jobs = vec![first];
        while count < config.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => {
                    count += job.inputs.len();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Callers that went away while they waited: nothing to run for them.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let inputs: Vec<&str> = jobs
            .iter()
            .flat_map(|j| j.inputs.iter().map(String::as_str))
            .collect();
        // A panic fails this batch, not the worker (which would leave the
        // model advertised and every later request "not running").
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.embed_batch(&inputs)
        }))
        .unwrap_or_else(|payload| {
            let reason = panic_message(&*payload);
            tracing::error!(model = %name, %reason, "the model panicked on a batch; its requests fail, the worker goes on");
            Err(ModelError::Invalid {
                model: name.to_owned(),
                reason: format!("the model panicked on this input: {reason}"),
            })
        });
        if let Ok(mut s) = stats.lock() {
            s.batches += 1;
            s.inputs += inputs.len() as u64;
            s.largest = s.largest.max(inputs.len());
        }
        match result {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for job in jobs {
                    let mine: Vec<Vec<f32>> = vectors.by_ref().take(job.inputs.len()).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(ModelError::Invalid {
                        model: name.to_owned(),
                        reason: reason.clone(),
                    }));
                }
            }
        }
    }
}

/// Something that generates text, streaming it (the real [`Generator`], or a test double).
pub trait GenerateText: Send + 'static {
    /// Continues `prompt`; `on_text` gets each piece and returns false to stop.
    fn generate_text(
        &mut self,
        prompt: &str,
        params: &Params,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(String, usize), ModelError>;
}

impl GenerateText for Generator {
    fn generate_text(
        &mut self,
        prompt: &str,
        params: &Params,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(String, usize), ModelError> {
        self.generate(prompt, params, on_text)
    }
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// More text.
    Text(String),
    /// The end: the whole text and the number of new tokens.
    Done {
        /// All of it.
        text: String,
        /// New tokens.
        tokens: usize,
    },
    /// It failed.
    Failed(String),
}

struct GenerateJob {
    prompt: String,
    params: Params,
    out: mpsc::Sender<Piece>,
}

/// A generation model behind its worker thread: one request at a time,
/// answers streamed; dropping the stream cancels the request.
#[derive(Debug, Clone)]
pub struct GenerateService {
    name: String,
    tx: SyncSender<GenerateJob>,
}

impl GenerateService {
    /// Starts the worker thread that owns `model`.
    pub fn start(name: &str, mut model: impl GenerateText, config: ServeConfig) -> Self {
        let (tx, rx) = sync_channel::<GenerateJob>(config.queue);
        let spawned = std::thread::Builder::new()
            .name(format!("generate-{name}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let out = job.out;
                    // Its caller went away while it waited: skip it.
                    if out.is_closed() {
                        continue;
                    }
                    let mut on_text =
                        |piece: &str| out.blocking_send(Piece::Text(piece.into())).is_ok();
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        model.generate_text(&job.prompt, &job.params, &mut on_text)
                    }));
                    let last = match run {
                        Ok(Ok((text, tokens))) => Piece::Done { text, tokens },
                        Ok(Err(e)) => Piece::Failed(e.to_string()),
                        // The request fails; the worker goes on (a
                        // generation's state lives in the call).
                        Err(payload) => {
                            let reason = panic_message(&*payload);
                            tracing::error!(%reason, "the model panicked on a request; it fails, the worker goes on");
                            Piece::Failed(format!("the model panicked on this input: {reason}"))
                        }
                    };
                    let _ = out.blocking_send(last);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a generation worker thread");
        }
        Self {
            name: name.to_owned(),
            tx,
        }
    }

    /// Queues a request; its pieces arrive on the returned stream. Refused
    /// at once when the queue is full.
    pub fn generate(
        &self,
        prompt: String,
        params: Params,
    ) -> Result<mpsc::Receiver<Piece>, ServeError> {
        let (out, pieces) = mpsc::channel(64);
        self.tx
            .try_send(GenerateJob {
                prompt,
                params,
                out,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => ServeError::Busy(self.name.clone()),
                TrySendError::Disconnected(_) => ServeError::Stopped(self.name.clone()),
            })?;
        Ok(pieces)
    }
}
