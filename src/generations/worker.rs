//! The generation worker: claims runnable jobs, runs each on the router
//! while renewing its lease, and stores the outcome.
//!
//! It wakes when a job is queued here or on another replica (see
//! [`Changes`]), and otherwise scans for runnable jobs every half lease, so
//! a job whose replica died is taken up soon after its lease runs out. A
//! worker that loses a lease (it stalled past it and another took the job)
//! abandons the job without writing. At shutdown it puts the jobs it holds
//! back in the queue, so the next replica (or this one restarted) runs
//! them at once instead of waiting out the lease.

use std::{sync::Arc, time::Duration};

use opentelemetry::KeyValue;
use tokio::{
    sync::{watch, Semaphore},
    time::Instant,
};

use super::{media_path, Changes, JobSpec, StoredError, StoredMedia, StoredUsage};
use crate::{
    accounting::{Entry, Ledger, LedgerRow},
    config::{GenerationsConfig, Modality},
    error::Error,
    providers::{GeneratedMedia, MediaData},
    routing::{CallOpts, Router, Tries},
    storage::{unix_ms, Claimed, Finished, Storage},
    telemetry::Telemetry,
};

/// Jobs one replica runs at once.
const CONCURRENCY: usize = 32;
/// A job taken this many times without ending (its worker died each time)
/// is failed rather than retried forever.
const MAX_CLAIMS: i64 = 5;

pub struct Worker {
    pub storage: Storage,
    /// The routing table now (replaced on reload).
    pub router: Arc<crate::reload::Swap<Router>>,
    pub ledger: Arc<Ledger>,
    pub telemetry: Arc<Telemetry>,
    pub changes: Arc<Changes>,
    pub config: GenerationsConfig,
    /// This replica's name on the leases it takes.
    pub owner: String,
}

/// Media bytes kept by the gateway: index, content type, bytes.
type Kept = Vec<(u32, String, Vec<u8>)>;

/// A job that ran to its end, and its books.
struct Ran {
    media: Vec<StoredMedia>,
    kept: Kept,
    usage: StoredUsage,
    row: LedgerRow,
    tries: Tries,
}

/// A job that failed, and its books.
struct Failed {
    error: Error,
    row: LedgerRow,
    tries: Tries,
}

/// How a job's run ended.
enum Outcome {
    Done(Box<Result<Ran, Box<Failed>>>),
    /// Another worker holds the lease now.
    LeaseLost,
    Stopping,
}

impl Worker {
    /// Claims and runs jobs until `stop` turns true, then releases the
    /// jobs still running and returns once they are released.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let scan = (self.config.lease / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tasks = tokio::task::JoinSet::new();
        let mut stopping = stop.clone();
        loop {
            if *stopping.borrow() {
                break;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else { break };
            let lease_until = unix_ms() + self.config.lease.as_millis() as i64;
            match self.storage.claim_generation(&self.owner, lease_until).await {
                Ok(Some(job)) => {
                    let me = self.clone();
                    let stop = stop.clone();
                    tasks.spawn(async move {
                        me.run_job(job, stop).await;
                        drop(slot);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("claiming a generation: {e}"),
            }
            drop(slot);
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = self.changes.work.notified() => {}
                _ = tokio::time::sleep(scan) => {}
                _ = stopping.changed() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn run_job(&self, job: Claimed, mut stop: watch::Receiver<bool>) {
        let id = job.id.clone();
        self.changes.publish(&id, "running");
        let outcome = tokio::select! {
            r = self.execute(&job) => Outcome::Done(Box::new(r)),
            _ = self.hold_lease(&id) => Outcome::LeaseLost,
            _ = stop.wait_for(|s| *s) => Outcome::Stopping,
        };
        let ended = match outcome {
            Outcome::Done(r) => *r,
            Outcome::LeaseLost => {
                tracing::warn!(job = %id, "lost the lease on a generation; leaving it to its new owner");
                return;
            }
            Outcome::Stopping => {
                match self.storage.release_generation(&id, &self.owner).await {
                    Ok(_) => tracing::info!(job = %id, "shutting down: generation put back in the queue"),
                    Err(e) => tracing::warn!(job = %id, "could not release a generation (it is retaken after its lease): {e}"),
                }
                // Another replica may take it at once.
                self.changes.publish(&id, "queued");
                let _ = self.storage.notify_generation(&id, "queued").await;
                return;
            }
        };
        let status = match ended {
            Ok(Ran { media, kept, usage, row, tries }) => {
                let output = serde_json::to_string(&media).unwrap_or_else(|_| "[]".into());
                let usage = serde_json::to_string(&usage).ok();
                let finished = Finished {
                    status: "completed",
                    output: Some(&output),
                    error: None,
                    usage: usage.as_deref(),
                    media: &kept,
                };
                if !self.finish(&id, &finished, row, &tries).await {
                    return;
                }
                "completed"
            }
            Err(failed) => {
                let Failed { error: e, row, tries } = *failed;
                let error = serde_json::to_string(&StoredError::from(&e)).ok();
                let finished = Finished {
                    status: "failed",
                    output: None,
                    error: error.as_deref(),
                    usage: None,
                    media: &[],
                };
                if !self.finish(&id, &finished, row, &tries).await {
                    return;
                }
                "failed"
            }
        };
        self.changes.publish(&id, status);
        if let Err(e) = self.storage.notify_generation(&id, status).await {
            tracing::warn!(job = %id, "could not notify other replicas: {e}");
        }
    }

    /// Writes the job's end and, if it was still ours, its ledger entry.
    async fn finish(&self, id: &str, finished: &Finished<'_>, row: LedgerRow, tries: &Tries) -> bool {
        match self.storage.finish_generation(id, &self.owner, finished).await {
            Ok(true) => {
                let mut attempts = tries.attempt_rows();
                if let Some(a) = attempts.iter_mut().find(|a| a.outcome == "success") {
                    a.provider_cost_usd = row.cost_usd;
                }
                if let Err(e) = self.ledger.record(Entry { row, attempts }).await {
                    tracing::error!(job = %id, "ledger journal write failed: {e}");
                }
                true
            }
            Ok(false) => {
                tracing::warn!(job = %id, "generation finished after its lease passed to another worker; result dropped");
                false
            }
            Err(e) => {
                // Left running under our lease: retaken when it runs out.
                tracing::error!(job = %id, "storing a generation's end: {e}");
                false
            }
        }
    }

    /// Renews the lease every third of it; resolves only if it was lost.
    async fn hold_lease(&self, id: &str) {
        let every = self.config.lease / 3;
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(every).await;
            let until = unix_ms() + self.config.lease.as_millis() as i64;
            match self.storage.renew_generation(id, &self.owner, until).await {
                Ok(true) => failures = 0,
                Ok(false) => return,
                Err(e) => {
                    // The database may be back before the lease runs out.
                    failures += 1;
                    tracing::warn!(job = %id, "renewing a generation lease: {e}");
                    if failures >= 2 {
                        return;
                    }
                }
            }
        }
    }

    async fn execute(&self, job: &Claimed) -> Result<Ran, Box<Failed>> {
        let started = Instant::now();
        let mut row = LedgerRow::new(job.id.clone(), job.client_request_id.clone(), job.key_name.clone(), job.model.clone());
        let mut tries = Tries::default();
        let fail = |e: Error, mut row: LedgerRow, tries: Tries| {
            row.error_code = Some(e.code().to_owned());
            row.attempts = tries.count();
            row.latency_ms = started.elapsed().as_millis() as u64;
            Err(Box::new(Failed { error: e, row, tries }))
        };
        let spec: JobSpec = match serde_json::from_str(&job.spec) {
            Ok(s) => s,
            Err(e) => return fail(Error::Internal(format!("stored generation is unreadable: {e}")), row, tries),
        };
        if job.claims > MAX_CLAIMS {
            return fail(Error::Internal(format!("the generation was interrupted {} times; giving up", job.claims - 1)), row, tries);
        }
        let router = self.router.load();
        let Some(model) = router.model(&job.model) else {
            return fail(Error::invalid_param(format!("model {:?} is no longer served", job.model), "model"), row, tries);
        };
        let video = model.modality == Modality::Video;
        let trace = self.telemetry.job_span(
            spec.traceparent.as_deref(),
            format!("generation {}", job.model),
            vec![KeyValue::new("switchyard.generation.id", job.id.clone()), KeyValue::new("switchyard.model", job.model.clone())],
        );
        let opts = CallOpts {
            deadline: Instant::now() + self.config.timeout,
            failover: spec.failover,
            trace,
        };
        let wanted = spec.spec.clone();
        let served = match router.generate(&model, Arc::new(spec.spec), &opts, &mut tries, self.config.timeout).await {
            Ok(s) => s,
            Err(e) => return fail(e, row, tries),
        };
        let (media, kept) = store_media(&job.id, served.value);
        let usage = if video {
            let seconds = media.iter().filter_map(|m| m.duration).sum::<f64>();
            let seconds = if seconds > 0.0 { seconds } else { wanted.duration.unwrap_or(0.0) };
            StoredUsage {
                images: 0,
                video_seconds: seconds,
                cost_usd: seconds * served.route.price.per_second.unwrap_or(0.0),
            }
        } else {
            let images = media.len() as u32;
            StoredUsage {
                images,
                video_seconds: 0.0,
                cost_usd: f64::from(images) * served.route.price.per_image.unwrap_or(0.0),
            }
        };
        row.provider = Some(served.route.provider.clone());
        row.upstream_model = Some(served.route.upstream_model.clone());
        row.cost_usd = usage.cost_usd;
        row.unit = Some(if video { "video_seconds" } else { "images" }.into());
        row.units = if video { usage.video_seconds } else { f64::from(usage.images) };
        row.attempts = served.attempts;
        row.outcome = "success".into();
        row.latency_ms = started.elapsed().as_millis() as u64;
        Ok(Ran { media, kept, usage, row, tries })
    }
}

/// The job's media as stored: URLs passed through, bytes kept for the
/// gateway to serve.
fn store_media(id: &str, produced: Vec<GeneratedMedia>) -> (Vec<StoredMedia>, Kept) {
    let mut media = Vec::with_capacity(produced.len());
    let mut kept = Vec::new();
    for (n, m) in produced.into_iter().enumerate() {
        let n = n as u32;
        let url = match m.data {
            MediaData::Url(u) => u,
            MediaData::Bytes(b) => {
                kept.push((n, m.content_type.clone(), b.to_vec()));
                media_path(id, n)
            }
        };
        media.push(StoredMedia {
            url,
            kind: if m.video { "video" } else { "image" }.into(),
            content_type: m.content_type,
            width: m.width,
            height: m.height,
            duration: m.duration,
        });
    }
    (media, kept)
}
