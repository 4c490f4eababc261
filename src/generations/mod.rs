//! Image and video generations: jobs that outlive their request.
//!
//! `POST /v1/generations` (or `Generations/Create`) stores a job as
//! `queued` and wakes this replica's [`worker`]. Any replica's worker may
//! claim it: a claim is a lease in storage (`generations.lease`), renewed
//! while the job runs, so the job of a replica that died is taken up by
//! another once its lease runs out, and every write that ends a job is
//! fenced on the lease, so a job never completes twice. The worker routes
//! the job like any request (scores, failover, retry budget, one span per
//! attempt, in the trace of the request that created it) and stores what
//! it produced: a provider's URLs as they are, bytes in storage, served at
//! `/v1/generations/{id}/media/{n}`.
//!
//! Waiting is a long poll without polling: a waiter subscribes to
//! [`Changes`], reads the job, and sleeps until that job changes or its
//! window ends. Changes travel in memory within a replica and through
//! PostgreSQL `LISTEN/NOTIFY` between replicas; a slow re-read every few
//! seconds only covers a notification lost while the listener reconnects.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{broadcast, watch, Notify},
    time::{sleep_until, Instant},
};

use crate::{
    config::Modality,
    error::Error,
    proto,
    providers::GenerationSpec,
    storage::{GenerationRow, Storage, NOTIFY_CHANNEL},
};

pub mod worker;

/// Longest client-chosen wait, seconds.
pub const MAX_WAIT_SECS: f64 = 60.0;
/// The safety re-read while waiting (a notification lost in a listener
/// reconnect costs at most this).
const RECHECK: Duration = Duration::from_secs(5);

/// The `"auto"` wait per modality: most images finish within it; a video
/// takes minutes, so its window is as long as a client may ask.
pub fn auto_wait(modality: Modality) -> Duration {
    match modality {
        Modality::Video => Duration::from_secs(55),
        _ => Duration::from_secs(30),
    }
}

/// What is stored as a job's `spec`: the validated request and how it may
/// be routed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub spec: GenerationSpec,
    pub failover: bool,
    /// The creating request's trace context: the job's spans join it.
    pub traceparent: Option<String>,
}

/// A medium as stored in `output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMedia {
    pub url: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub content_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
}

/// What a job used and cost, as stored in `usage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredUsage {
    #[serde(default)]
    pub images: u32,
    #[serde(default)]
    pub video_seconds: f64,
    #[serde(default)]
    pub cost_usd: f64,
}

/// A failed job's error, as stored in `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

impl From<&Error> for StoredError {
    fn from(e: &Error) -> Self {
        StoredError {
            code: e.code().to_owned(),
            message: e.to_string(),
            param: e.param().map(str::to_owned),
        }
    }
}

/// The path at which the gateway serves media it keeps.
pub fn media_path(id: &str, n: u32) -> String {
    format!("/v1/generations/{id}/media/{n}")
}

/// Job changes, fanned out to waiters and the worker.
pub struct Changes {
    /// Ids of jobs that changed.
    tx: broadcast::Sender<Arc<str>>,
    /// Wakes the worker: a job became runnable.
    pub(crate) work: Notify,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            tx: broadcast::channel(1024).0,
            work: Notify::new(),
        }
    }
}

impl Changes {
    /// Tells this replica's waiters (and, for a queued job, its worker).
    pub fn publish(&self, id: &str, status: &str) {
        let _ = self.tx.send(Arc::from(id));
        if status == "queued" {
            self.work.notify_one();
        }
    }

    /// Forwards other replicas' `NOTIFY`s into this replica, reconnecting
    /// as needed, until `stop` says so.
    pub fn listen(self: &Arc<Self>, storage: &Storage, mut stop: watch::Receiver<bool>) {
        let Storage::Postgres(pool) = storage else { return };
        let pool = pool.clone();
        let changes = self.clone();
        tokio::spawn(async move {
            loop {
                let listener = async {
                    let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                    l.listen(NOTIFY_CHANNEL).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                let mut l = tokio::select! {
                    l = listener => l,
                    _ = stop.wait_for(|s| *s) => return,
                };
                match &mut l {
                    Ok(l) => loop {
                        let n = tokio::select! {
                            n = l.recv() => n,
                            _ = stop.wait_for(|s| *s) => return,
                        };
                        match n {
                            Ok(n) => {
                                let (id, status) = n.payload().split_once(' ').unwrap_or((n.payload(), ""));
                                changes.publish(id, status);
                            }
                            Err(e) => {
                                tracing::warn!("generation notifications: {e}; reconnecting");
                                break;
                            }
                        }
                    },
                    Err(e) => tracing::warn!("generation notifications: {e}; retrying"),
                }
                // Anything may have changed while we were deaf.
                changes.work.notify_one();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }
}

/// Jobs as their owners see them.
pub struct Jobs {
    pub storage: Storage,
    pub changes: Arc<Changes>,
    /// True once this replica drains: waits end early.
    pub draining: watch::Receiver<bool>,
}

impl Jobs {
    /// Records a change everywhere it must be seen.
    pub async fn changed(&self, id: &str, status: &str) {
        self.changes.publish(id, status);
        if let Err(e) = self.storage.notify_generation(id, status).await {
            tracing::warn!(job = id, "could not notify other replicas: {e}");
        }
    }

    /// The job, once it ended or when `until` passes, whichever is first.
    pub async fn wait(&self, id: &str, key_name: &str, until: Instant) -> Result<GenerationRow, Error> {
        let mut rx = self.changes.tx.subscribe();
        let mut draining = self.draining.clone();
        loop {
            let row = self
                .storage
                .generation(id, key_name)
                .await
                .map_err(|e| Error::Internal(format!("reading generation: {e}")))?
                .ok_or_else(|| Error::not_found(format!("generation {id:?} does not exist"), None))?;
            let now = Instant::now();
            if matches!(row.status.as_str(), "completed" | "failed") || now >= until || *draining.borrow() {
                return Ok(row);
            }
            let recheck = until.min(now + RECHECK);
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Ok(changed) if &*changed != id => continue,
                        // This job changed, or we missed some changes.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            sleep_until(recheck).await;
                            break;
                        }
                    },
                    _ = sleep_until(recheck) => break,
                    _ = draining.changed() => break,
                }
            }
        }
    }
}

/// A stored job as the proto's `Generation`.
pub fn to_proto(row: &GenerationRow) -> proto::Generation {
    use proto::GenerationStatus as S;
    let status = match row.status.as_str() {
        "queued" => S::Queued,
        "running" => S::Running,
        "completed" => S::Completed,
        "failed" => S::Failed,
        _ => S::Unspecified,
    };
    let media: Vec<StoredMedia> = row.output.as_deref().and_then(|o| serde_json::from_str(o).ok()).unwrap_or_default();
    let error: Option<StoredError> = row.error.as_deref().and_then(|e| serde_json::from_str(e).ok());
    let usage: Option<StoredUsage> = row.usage.as_deref().and_then(|u| serde_json::from_str(u).ok());
    proto::Generation {
        id: row.id.clone(),
        status: status as i32,
        model: row.model.clone(),
        created_at: row.created_at,
        completed_at: row.completed_at,
        media: media
            .into_iter()
            .map(|m| proto::Media {
                url: m.url,
                r#type: m.kind,
                content_type: m.content_type,
                width: m.width,
                height: m.height,
                duration: m.duration,
            })
            .collect(),
        error: error.map(|e| proto::GenerationError {
            code: e.code,
            message: e.message,
            param: e.param,
        }),
        usage: usage.map(|u| proto::GenerationUsage {
            images: u.images,
            video_seconds: u.video_seconds,
            cost_usd: u.cost_usd,
        }),
    }
}

impl proto::GenerationStatus {
    pub fn api_name(self) -> &'static str {
        match self {
            proto::GenerationStatus::Queued | proto::GenerationStatus::Unspecified => "queued",
            proto::GenerationStatus::Running => "running",
            proto::GenerationStatus::Completed => "completed",
            proto::GenerationStatus::Failed => "failed",
        }
    }
}
