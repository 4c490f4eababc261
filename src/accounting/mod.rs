//! Accounting: one ledger row per request, and one row per provider
//! attempt, priced by the routes' prices.
//!
//! A request's row is made durable before the client receives the
//! response's last byte. With Redis configured it is added to a Redis
//! stream that every replica drains into the database ([`redis_stream`]):
//! durable beyond the replica. Otherwise (or while Redis is down) it is
//! appended to a local journal (one JSON line, one `write`: a process killed
//! with SIGKILL loses nothing the kernel was handed), which a background
//! writer moves into the database in batches and which is replayed from the
//! start when the gateway starts. Rows are inserted only if their request id
//! is absent, so every row reaches the database exactly once, and the
//! database stays off the request path.
//!
//! Budgets are enforced from the same figures: what the database holds for
//! a key (re-read when older than a quarter second, for keys with a budget
//! only) plus what this replica journaled and has not yet written there.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::Notify, time::Instant};

use crate::{config::Price, storage::Storage};

mod json_line;
pub mod redis_stream;

/// A request, as the ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRow {
    pub request_id: String,
    pub client_request_id: Option<String>,
    pub key_name: String,
    pub model: String,
    /// The provider that served it (for a stream: sent the first content).
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    /// What the key is charged.
    pub cost_usd: f64,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub attempts: u32,
    /// `success`, `error` or `abandoned` (the client left mid-stream).
    pub outcome: String,
    pub error_code: Option<String>,
    pub created_at: i64,
    /// What was metered besides tokens: `images`, `video_seconds`,
    /// `characters` or `audio_seconds` (none for chat).
    #[serde(default)]
    pub unit: Option<String>,
    /// How many of `unit`.
    #[serde(default)]
    pub units: f64,
}

impl LedgerRow {
    /// A request's row before anything is known of its outcome: an error,
    /// with nothing served, used or charged, made now.
    pub fn new(request_id: String, client_request_id: Option<String>, key_name: String, model: String) -> Self {
        LedgerRow {
            request_id,
            client_request_id,
            key_name,
            model,
            provider: None,
            upstream_model: None,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            cost_usd: 0.0,
            latency_ms: 0,
            ttft_ms: None,
            attempts: 0,
            outcome: "error".into(),
            error_code: None,
            created_at: crate::storage::unix_now(),
            unit: None,
            units: 0.0,
        }
    }
}

/// One provider attempt, with what that provider will bill for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRow {
    pub attempt: u32,
    pub provider: String,
    pub upstream_model: String,
    /// `success`, `failure` or `cancelled`.
    pub outcome: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub provider_cost_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub row: LedgerRow,
    pub attempts: Vec<AttemptRow>,
}

/// USD for `input` prompt tokens (of which `cached` came from the
/// provider's cache) and `output` tokens at `price`. Cached input is priced
/// at `cached_input_per_mtok` when the route gives one, never as fresh input
/// on top.
pub fn chat_cost(price: &Price, input: u64, cached: u64, output: u64) -> f64 {
    let per = |n: u64, p: Option<f64>| n as f64 * p.unwrap_or(0.0) / 1_000_000.0;
    let cached = cached.min(input);
    per(input - cached, price.input_per_mtok)
        + per(cached, price.cached_input_per_mtok.or(price.input_per_mtok))
        + per(output, price.output_per_mtok)
}

/// Journal size past which it is replaced by one holding only what is
/// not yet in the database.
const ROTATE_BYTES: u64 = 1024 * 1024;
/// Entries held in memory for the writer, at most; past it the writer
/// replays the journal file instead (the database being down, say).
const MAX_PENDING: usize = 100_000;
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How long opening waits for the journal's lock (see [`Ledger::open`]).
const LOCK_WAIT: Duration = Duration::from_secs(2);
const BUDGET_REFRESH: Duration = Duration::from_millis(250);
/// How long a budget check waits on the database before using what it has.
const BUDGET_READ_TIMEOUT: Duration = Duration::from_millis(200);

struct Spent {
    db: f64,
    refreshed: Instant,
}

/// The journal file and what was appended to it since the writer last
/// took its entries, under one lock: a line is in the file if and only if
/// it is in the database or in `pending` (or `overflowed` says to replay).
struct Journal {
    file: std::fs::File,
    pending: Vec<Entry>,
    overflowed: bool,
}

pub struct Ledger {
    journal: Mutex<Journal>,
    path: PathBuf,
    storage: Storage,
    /// Wakes the writer: a row arrived, or the ledger is gone.
    wake: Arc<Notify>,
    /// Held through a flush: one returns with what was journaled before it
    /// in the database, not in the writer's hands.
    flushing: tokio::sync::Mutex<()>,
    spent: Mutex<HashMap<String, Spent>>,
    /// Cost journaled here but not yet in the database, by key.
    unflushed: Mutex<HashMap<String, f64>>,
    /// Batches written to the database so far (a cached figure read across
    /// one is not kept).
    flushes: std::sync::atomic::AtomicU64,
    redis: Option<redis_stream::RedisLedger>,
    /// Every entry's attempts and time to first content, for `/metrics`.
    pub metrics: crate::metrics::Sink,
}

#[derive(Debug, thiserror::Error)]
#[error("ledger journal {path}: {source}")]
pub struct LedgerError {
    path: String,
    source: std::io::Error,
}

impl Ledger {
    /// Opens (creating if needed) the journal at `path` and starts the
    /// writer, which first replays whatever the journal still holds; with a
    /// `redis` URL, entries go to the shared stream first, and this replica
    /// helps drain it.
    pub fn open(path: &Path, storage: Storage, redis: Option<(&str, String)>) -> Result<Arc<Ledger>, LedgerError> {
        let err = |source| LedgerError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = open_locked(path, LOCK_WAIT).map_err(err)?;
        let redis_url = redis.clone();
        let redis = match redis {
            Some((url, stream)) => Some(redis_stream::RedisLedger::new(url, stream).map_err(|e| err(std::io::Error::other(e.to_string())))?),
            None => None,
        };
        let ledger = Arc::new(Ledger {
            journal: Mutex::new(Journal {
                file,
                pending: Vec::new(),
                // The journal may hold rows from before a crash: replay it.
                overflowed: true,
            }),
            path: path.to_owned(),
            storage: storage.clone(),
            wake: Arc::default(),
            flushing: tokio::sync::Mutex::new(()),
            spent: Mutex::default(),
            unflushed: Mutex::default(),
            flushes: std::sync::atomic::AtomicU64::new(0),
            redis,
            metrics: Default::default(),
        });
        // Off the request runtime, at background priority: a flush's
        // statement building and SQLite's work on it wait for idle moments.
        let (weak, wake) = (Arc::downgrade(&ledger), ledger.wake.clone());
        crate::background::spawn("ledger-writer", move || writer(weak, wake)).map_err(err)?;
        if let Some((url, stream)) = redis_url {
            let drainer = tokio::spawn(redis_stream::RedisLedger::drain(url.to_owned(), stream, storage));
            // The drainer lives as long as the ledger.
            let weak = Arc::downgrade(&ledger);
            tokio::spawn(async move {
                while weak.upgrade().is_some() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                drainer.abort();
            });
        }
        Ok(ledger)
    }

    /// Makes a request's entry durable: in the shared Redis stream if there
    /// is one and it answers, else in the local journal. A journal that
    /// cannot be written logs the row whole, so it can be recovered.
    pub async fn record(&self, entry: Entry) -> Result<(), std::io::Error> {
        self.metrics.observe_entry(&entry);
        if let Some(r) = &self.redis {
            match r.append(&entry).await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!("ledger stream unavailable ({e}); journaling locally"),
            }
        }
        self.journal(entry)
    }

    /// Appends to the local journal; returns once the line is in the
    /// kernel's hands. The entry is kept (moved, not copied) for the writer.
    pub fn journal(&self, entry: Entry) -> Result<(), std::io::Error> {
        let mut line = Vec::with_capacity(768);
        json_line::write_entry(&mut line, &entry);
        line.push(b'\n');
        if entry.row.cost_usd > 0.0 {
            let mut unflushed = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
            match unflushed.get_mut(&entry.row.key_name) {
                Some(spent) => *spent += entry.row.cost_usd,
                None => {
                    unflushed.insert(entry.row.key_name.clone(), entry.row.cost_usd);
                }
            }
        }
        {
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            // One write of the whole line: O_APPEND keeps lines whole.
            if let Err(e) = j.file.write_all(&line) {
                drop(j);
                self.unwind_unflushed(&entry);
                tracing::error!(row = ?entry.row, "ledger journal write failed: {e}");
                return Err(e);
            }
            // The writer takes it from memory, not by reading the file back.
            if j.pending.len() < MAX_PENDING {
                j.pending.push(entry);
            } else {
                j.overflowed = true;
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Takes back what [`Ledger::journal`] counted as unflushed for a row it
    /// could not write.
    fn unwind_unflushed(&self, entry: &Entry) {
        if entry.row.cost_usd > 0.0 {
            let mut unflushed = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(spent) = unflushed.get_mut(&entry.row.key_name) {
                *spent = (*spent - entry.row.cost_usd).max(0.0);
            }
        }
    }

    /// What `key` has spent: the database's figure (re-read when stale)
    /// plus what this replica journaled and has not written there yet. A
    /// row in both for a moment is counted twice — erring towards refusing,
    /// never towards overspending.
    pub async fn spent(&self, key: &str) -> f64 {
        let unflushed = || self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0.0);
        let cached = {
            let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
            spent.get(key).map(|s| (s.db, s.refreshed.elapsed() < BUDGET_REFRESH))
        };
        if let Some((db, true)) = cached {
            return db + unflushed();
        }
        // What is unflushed now, then the database: a row flushed in
        // between is counted twice (refusing early), never missed.
        let epoch = self.flushes.load(std::sync::atomic::Ordering::SeqCst);
        let pending = unflushed();
        let stale = cached;
        let db = match tokio::time::timeout(BUDGET_READ_TIMEOUT, self.storage.spent(key)).await {
            Ok(Ok(db)) => {
                // Cached only if no flush landed meanwhile (it may or
                // may not be in what was read).
                if self.flushes.load(std::sync::atomic::Ordering::SeqCst) == epoch {
                    let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
                    spent.insert(key.to_owned(), Spent { db, refreshed: Instant::now() });
                }
                db
            }
            Ok(Err(e)) => {
                tracing::warn!("reading spend for a budget: {e}");
                stale.map_or(0.0, |s| s.0)
            }
            Err(_) => stale.map_or(0.0, |s| s.0),
        };
        db + pending
    }

    /// Entries now in the database no longer count as unflushed, and the
    /// database figure cached for their keys is stale: forgetting it makes
    /// the next budget check re-read it, so a spend is never counted in
    /// neither place.
    fn flushed(&self, entries: &[Entry]) {
        let charged = || entries.iter().filter(|e| e.row.cost_usd > 0.0);
        self.flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        {
            let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
            for e in charged() {
                spent.remove(&e.row.key_name);
            }
        }
        let mut unflushed = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        for e in charged() {
            if let Some(v) = unflushed.get_mut(&e.row.key_name) {
                *v = (*v - e.row.cost_usd).max(0.0);
            }
        }
        unflushed.retain(|_, v| *v > 1e-12);
    }

    /// Moves everything journaled into the database now (at shutdown).
    /// Entries journaled here and not yet in the database.
    pub fn queue_depth(&self) -> usize {
        self.journal.lock().unwrap_or_else(|p| p.into_inner()).pending.len()
    }

    pub async fn flush(&self) {
        if let Err(e) = flush_once(self, &self.storage).await {
            tracing::error!("ledger flush at shutdown: {e}; the journal keeps the rows for the next start");
        }
    }
}

/// Moves what was journaled into the database: the entries held in memory,
/// or (at start, or after memory overflowed) every line of the journal file,
/// then empties a journal that is all in the database and large enough.
/// Inserts skip request ids already present, so a line written twice lands
/// once.
async fn flush_once(ledger: &Ledger, storage: &Storage) -> Result<(), String> {
    let _one_at_a_time = ledger.flushing.lock().await;
    let (pending, replay) = {
        let mut j = ledger.journal.lock().unwrap_or_else(|p| p.into_inner());
        let replay = std::mem::take(&mut j.overflowed);
        (std::mem::take(&mut j.pending), replay)
    };
    let entries = if replay { read_journal(&ledger.path).await? } else { pending };
    if !entries.is_empty() {
        if let Err(e) = storage.insert_entries(&entries).await {
            // Not lost: the file still holds them; replay it next time.
            ledger.journal.lock().unwrap_or_else(|p| p.into_inner()).overflowed = true;
            return Err(e.to_string());
        }
        // (A replayed journal's entries were never counted as unflushed;
        // subtracting them is floored at zero.)
        ledger.flushed(&entries);
    }
    // Under the append lock, every line in the file is in the database or
    // in `pending`: a large file is replaced by one holding only the
    // pending lines. (Waiting for a moment with nothing pending, as this
    // once did, never came under steady load: the journal grew by the
    // whole traffic, 100 MB in a ten-second benchmark, and emptying it
    // then stalled appends for the time the kernel took to free it.)
    let old = {
        let mut j = ledger.journal.lock().unwrap_or_else(|p| p.into_inner());
        if j.overflowed || j.file.metadata().map(|m| m.len()).unwrap_or(0) < ROTATE_BYTES {
            return Ok(());
        }
        let fresh = fresh_journal(&ledger.path, &j.pending).map_err(|e| format!("rotating the journal: {e}"))?;
        std::mem::replace(&mut j.file, fresh)
    };
    // Closing the replaced file frees its pages: off the request path.
    tokio::task::spawn_blocking(move || drop(old));
    Ok(())
}

/// Opens the journal at `path` for appends, holding its lock.
///
/// One gateway per journal: two appending and truncating one file could
/// lose rows. A ledger of this process that was just dropped lets go of
/// the lock once its writer ends the batch in hand, so this waits a little
/// for it before refusing; and since that batch may end by renaming a
/// fresh journal over `path`, the file locked must still be the one there.
fn open_locked(path: &Path, wait: Duration) -> std::io::Result<std::fs::File> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        match file.try_lock() {
            Ok(()) if is_at(&file, path)? => return Ok(file),
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::other(
                    "in use by another gateway process; give each replica its own storage.ledger_journal",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `file` is (still) the file at `path`.
#[cfg(unix)]
fn is_at(file: &std::fs::File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (open, named) = (file.metadata()?, std::fs::metadata(path)?);
    Ok((open.dev(), open.ino()) == (named.dev(), named.ino()))
}

#[cfg(not(unix))]
fn is_at(_file: &std::fs::File, _path: &Path) -> std::io::Result<bool> {
    Ok(true)
}

/// A journal holding `pending`'s lines, renamed over the one at `path`
/// (atomically: a crash leaves one or the other, each with every line not
/// yet in the database). It is locked before it takes the path.
fn fresh_journal(path: &Path, pending: &[Entry]) -> std::io::Result<std::fs::File> {
    let mut lines = Vec::with_capacity(pending.len() * 512);
    for e in pending {
        json_line::write_entry(&mut lines, e);
        lines.push(b'\n');
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".rotating");
    let tmp = PathBuf::from(tmp);
    // Left by a rotation cut short: never renamed, so nothing relies on it.
    let _ = std::fs::remove_file(&tmp);
    // Opened for appends, like the file it replaces, and kept.
    let mut file = std::fs::OpenOptions::new().create_new(true).append(true).open(&tmp)?;
    file.try_lock().map_err(|_| std::io::Error::other("the rotated journal is locked by another process"))?;
    file.write_all(&lines)?;
    std::fs::rename(&tmp, path)?;
    Ok(file)
}

/// Every complete line of the journal file.
async fn read_journal(path: &Path) -> Result<Vec<Entry>, String> {
    let path = path.to_owned();
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok(bytes[..complete]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| match serde_json::from_slice(l) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::error!("skipping an unreadable ledger journal line: {e}");
                None
            }
        })
        .collect())
}

/// Holds the ledger only while it flushes, so that dropping the last
/// handle elsewhere releases the journal (and its lock) at once, or after
/// the batch in hand; then it stops.
async fn writer(ledger: std::sync::Weak<Ledger>, wake: Arc<Notify>) {
    // Its own connection, opened from this thread: SQLite's worker thread
    // for it inherits this one's priority.
    let Some(storage) = ledger.upgrade().map(|l| l.storage.for_background_writer()) else { return };
    loop {
        {
            let Some(l) = ledger.upgrade() else { return };
            if let Err(e) = flush_once(&l, &storage).await {
                tracing::error!("ledger writer: {e}; retrying");
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if ledger.strong_count() == 0 {
            return;
        }
        // Batch what arrives meanwhile.
        tokio::time::sleep(FLUSH_EVERY).await;
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // The writer stops rather than wait out its timer.
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("switchyard-ledger-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("journal.jsonl")
    }

    #[test]
    fn a_journal_held_elsewhere_is_refused_after_the_wait() {
        let path = temp_path("held");
        let _held = open_locked(&path, Duration::ZERO).unwrap();
        let started = std::time::Instant::now();
        let refused = open_locked(&path, Duration::from_millis(100)).unwrap_err();
        assert!(refused.to_string().contains("in use by another gateway process"), "{refused}");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_waiting_opener_takes_the_journal_at_the_path_once_a_rotating_holder_lets_go() {
        let path = temp_path("rotated");
        let old = open_locked(&path, Duration::ZERO).unwrap();
        // While another opener waits, the holder rotates (a fresh journal
        // renamed over the path, locked) and then lets go of both.
        let waiter = std::thread::spawn({
            let path = path.clone();
            move || open_locked(&path, Duration::from_secs(5))
        });
        std::thread::sleep(Duration::from_millis(30));
        let mut fresh = fresh_journal(&path, &[]).unwrap();
        // Locking `old` now would lock a file no longer at the path.
        assert!(!is_at(&old, &path).unwrap() && is_at(&fresh, &path).unwrap());
        drop(old);
        std::thread::sleep(Duration::from_millis(30));
        fresh.write_all(b"a line\n").unwrap();
        drop(fresh);
        let mut taken = waiter.join().unwrap().unwrap();
        assert!(is_at(&taken, &path).unwrap());
        taken.write_all(b"another\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a line\nanother\n");
    }

    #[test]
    fn cached_input_is_priced_as_cached_not_on_top() {
        let price = Price {
            input_per_mtok: Some(1.0),
            output_per_mtok: Some(2.0),
            cached_input_per_mtok: Some(0.25),
            ..Default::default()
        };
        let c = chat_cost(&price, 1_000_000, 400_000, 500_000);
        assert!((c - (0.6 + 0.1 + 1.0)).abs() < 1e-9, "{c}");
        let no_cached_price = Price {
            input_per_mtok: Some(1.0),
            ..Default::default()
        };
        assert!((chat_cost(&no_cached_price, 1_000_000, 400_000, 0) - 1.0).abs() < 1e-9);
    }
}
