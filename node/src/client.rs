//! The CLI's side of the HTTP API: one GET with a timeout and errors that
//! say what to do.

use std::time::Duration;

use anyhow::{anyhow, Result};
use serde::de::DeserializeOwned;

/// How long the CLI waits for a node before it gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to the node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one node's API.
#[derive(Debug)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for the node at `api` (HOST:PORT).
    pub fn new(api: &str) -> Result<Self> {
        Self::with_timeout(api, REQUEST_TIMEOUT)
    }

    /// A client that waits up to `timeout` for an answer (a task that
    /// generates text may take minutes on a busy CPU).
    pub fn with_timeout(api: &str, timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| anyhow!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            base: format!("http://{api}"),
            http,
        })
    }

    /// POSTs `body` as JSON to `path` and returns the answer as it starts
    /// to come (for a stream); an error when it is not a success.
    pub async fn post_streaming<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .post(&url)
            .header("accept", "text/event-stream")
            .json(body)
            .send()
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot reach the agentmesh API at {}: {e}; is a node running there? Start one with `agentmesh node start` or pass --api HOST:PORT",
                    self.base
                )
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(anyhow!("{url} answered {status}: {detail}"))
    }

    /// GETs `path` and decodes the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(reqwest::Method::GET, path, None::<&()>).await
    }

    /// Sends `body` as JSON with `method` to `path` and decodes the JSON answer.
    pub async fn send<T: DeserializeOwned, B: serde::Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                "it did not answer in time".to_owned()
            } else if e.is_connect() {
                "nothing answers there".to_owned()
            } else {
                e.to_string()
            };
            anyhow!(
                "cannot reach the agentmesh API at {}: {why}; is a node running there? Start one with `agentmesh node start` or pass --api HOST:PORT",
                self.base
            )
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| anyhow!("reading the answer of {url}: {e}"))?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(anyhow!("{url} answered {status}: {detail}"));
        }
        serde_json::from_slice(&body).map_err(|e| anyhow!("{url} answered something that is not what this CLI expects ({e}); are the CLI and node versions the same?"))
    }
}
