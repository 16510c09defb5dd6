//! What a task can fail with: an HTTP status, a stable name, a sentence
//! that says what to do. The node turns it into its API error; the
//! simulator reads the name.

/// A task that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// The HTTP status it answers with.
    pub status: u16,
    /// A stable name (`stale_epoch`, `residency`, ...).
    pub name: &'static str,
    /// What was wrong and what to do.
    pub detail: String,
    /// For 429: seconds until a retry can pass.
    pub retry_after_s: Option<u64>,
}

impl TaskError {
    /// An error with `status`, `name` and `detail`.
    pub fn new(status: u16, name: &'static str, detail: String) -> Self {
        Self {
            status,
            name,
            detail,
            retry_after_s: None,
        }
    }

    /// A storage failure (500).
    pub fn storage(detail: String) -> Self {
        Self::new(500, "storage", detail)
    }

    /// Past a rate limit (429, retry after `retry_after_s`).
    pub fn too_many(detail: String, retry_after_s: u64) -> Self {
        Self {
            status: 429,
            name: "rate_limited",
            detail,
            retry_after_s: Some(retry_after_s),
        }
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.name, self.status, self.detail)
    }
}

impl std::error::Error for TaskError {}
