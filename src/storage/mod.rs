//! Storage: SQLite (the embedded default, one file) or PostgreSQL (shared
//! by several replicas), through sqlx, with migrations applied at start.
//!
//! It holds the gateway keys minted by `switchyard keys create`. The request
//! path never waits on it for long: keys are cached in memory (`auth.rs`),
//! so the database sees a lookup only when a key is new to a replica or its
//! cache entry expired.
//!
//! SQL is written once, with `$n` placeholders both engines accept, and run
//! on whichever pool the URL chose.

use std::{str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    PgPool, SqlitePool,
};

#[derive(Clone, Debug)]
pub enum Storage {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage: {0}")]
    Db(#[from] sqlx::Error),
    #[error("storage migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("storage url: {0}")]
    Url(String),
    #[error("{0}")]
    Conflict(String),
}

/// A stored key, as `keys list` shows it (never the key itself).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    pub name: String,
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub budget_usd: Option<f64>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// One line of `switchyard usage`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageLine {
    pub key: String,
    pub model: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
}

/// What `keys create` stores.
pub struct NewKey<'a> {
    pub name: &'a str,
    pub digest_hex: &'a str,
    pub models: &'a [String],
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub budget_usd: Option<f64>,
}

/// Runs `$body` with `$pool` bound to whichever pool this is.
macro_rules! on_pool {
    ($storage:expr, $pool:ident => $body:expr) => {
        match $storage {
            Storage::Sqlite($pool) => $body,
            Storage::Postgres($pool) => $body,
        }
    };
}

type KeyRow = (String, String, Option<i64>, Option<i64>, Option<f64>, i64, Option<i64>);

fn key_from_row(r: KeyRow) -> StoredKey {
    StoredKey {
        name: r.0,
        models: serde_json::from_str(&r.1).unwrap_or_default(),
        requests_per_minute: r.2.and_then(|n| u32::try_from(n).ok()),
        tokens_per_minute: r.3.and_then(|n| u64::try_from(n).ok()),
        budget_usd: r.4,
        created_at: r.5,
        revoked_at: r.6,
    }
}

/// `SELECT <key columns> FROM keys` and the rest of the statement, as one
/// static string.
macro_rules! select_keys {
    ($rest:literal) => {
        concat!("SELECT name, models, requests_per_minute, tokens_per_minute, budget_usd, created_at, revoked_at FROM keys ", $rest)
    };
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl Storage {
    /// Connects to `url` (`sqlite://file.db`, `sqlite:///abs/path.db`,
    /// `postgres://...`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Storage, StorageError> {
        let storage = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL with NORMAL syncs at checkpoints, not every commit: the
                // ledger journal (the durability point) is not fsynced
                // either, and an fsync per ledger batch stalled unrelated
                // writes on the same disk by up to ~0.4 s under load.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
            sqlx::migrate!("src/storage/migrations/sqlite").run(&pool).await?;
            Storage::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?;
            sqlx::migrate!("src/storage/migrations/postgres").run(&pool).await?;
            Storage::Postgres(pool)
        } else {
            return Err(StorageError::Url("expected sqlite:// or postgres://".into()));
        };
        Ok(storage)
    }

    /// The storage a background writer uses (`background.rs`): a pool of
    /// its own, of one connection opened on first use, from the writer's
    /// thread. SQLite's worker thread for it is then spawned by (and as
    /// low in priority as) the writer's; a PostgreSQL socket is driven by
    /// the writer's runtime, not by a request thread's (nor the reverse).
    /// Call it on the writer's runtime.
    pub fn for_background_writer(&self) -> Storage {
        match self {
            Storage::Sqlite(pool) => {
                Storage::Sqlite(SqlitePoolOptions::new().max_connections(1).connect_lazy_with((*pool.connect_options()).clone()))
            }
            Storage::Postgres(pool) => Storage::Postgres(
                PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with((*pool.connect_options()).clone()),
            ),
        }
    }

    pub async fn create_key(&self, k: &NewKey<'_>) -> Result<(), StorageError> {
        let models = serde_json::to_string(k.models).unwrap_or_else(|_| "[\"*\"]".into());
        let sql = "INSERT INTO keys (name, digest, models, requests_per_minute, tokens_per_minute, budget_usd, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        let result = on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(k.name)
                .bind(k.digest_hex)
                .bind(&models)
                .bind(k.requests_per_minute.map(i64::from))
                .bind(k.tokens_per_minute.and_then(|n| i64::try_from(n).ok()))
                .bind(k.budget_usd)
                .bind(unix_now())
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        });
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StorageError::Conflict(format!("a key named {:?} already exists", k.name))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_keys(&self) -> Result<Vec<StoredKey>, StorageError> {
        let rows: Vec<KeyRow> = on_pool!(self, pool => sqlx::query_as(select_keys!("ORDER BY name")).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(key_from_row).collect())
    }

    /// Revokes a key by name; `false` if no active key has that name.
    pub async fn revoke_key(&self, name: &str) -> Result<bool, StorageError> {
        let sql = "UPDATE keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL";
        let done = on_pool!(self, pool => sqlx::query(sql).bind(unix_now()).bind(name).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// The active key with this digest, if any.
    pub async fn find_key(&self, digest_hex: &str) -> Result<Option<StoredKey>, StorageError> {
        let sql = select_keys!("WHERE digest = $1 AND revoked_at IS NULL");
        let row: Option<KeyRow> = on_pool!(self, pool => sqlx::query_as(sql).bind(digest_hex).fetch_optional(pool).await)?;
        Ok(row.map(key_from_row))
    }

    /// Inserts ledger entries, each only if its request id is absent.
    ///
    /// Rows go in as multi-row statements, in one transaction: per-row
    /// statements cost a round trip each, which on a busy gateway showed as
    /// a fifth of its CPU (SQLite's worker thread and the wake-ups to reach
    /// it). See [`statements`] for their sizes.
    pub async fn insert_entries(&self, entries: &[crate::accounting::Entry]) -> Result<(), StorageError> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let attempts: Vec<(&str, &crate::accounting::AttemptRow)> =
            entries.iter().flat_map(|e| e.attempts.iter().map(move |a| (e.row.request_id.as_str(), a))).collect();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let numbered = numbered_placeholders(pool);
            for chunk in statements(entries) {
                let sql = insert_sql(
                    "INSERT INTO ledger (request_id, client_request_id, key_name, model, provider, upstream_model, input_tokens, \
                     output_tokens, cached_tokens, cost_usd, latency_ms, ttft_ms, attempts, outcome, error_code, created_at, unit, units) ",
                    18,
                    chunk.len(),
                    " ON CONFLICT (request_id) DO NOTHING",
                    numbered,
                );
                // Built from the constant fragments above and placeholders only.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for e in chunk {
                    let r = &e.row;
                    q = q
                        .bind(&r.request_id)
                        .bind(&r.client_request_id)
                        .bind(&r.key_name)
                        .bind(&r.model)
                        .bind(&r.provider)
                        .bind(&r.upstream_model)
                        .bind(n(r.input_tokens))
                        .bind(n(r.output_tokens))
                        .bind(n(r.cached_tokens))
                        .bind(r.cost_usd)
                        .bind(n(r.latency_ms))
                        .bind(r.ttft_ms.map(n))
                        .bind(i64::from(r.attempts))
                        .bind(&r.outcome)
                        .bind(&r.error_code)
                        .bind(r.created_at)
                        .bind(&r.unit)
                        .bind(r.units);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in statements(&attempts) {
                let sql = insert_sql(
                    "INSERT INTO ledger_attempts (request_id, attempt, provider, upstream_model, outcome, input_tokens, output_tokens, provider_cost_usd) ",
                    8,
                    chunk.len(),
                    " ON CONFLICT (request_id, attempt) DO NOTHING",
                    numbered,
                );
                // Built from the constant fragments above and placeholders only.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (id, a) in chunk {
                    q = q
                        .bind(*id)
                        .bind(i64::from(a.attempt))
                        .bind(&a.provider)
                        .bind(&a.upstream_model)
                        .bind(&a.outcome)
                        .bind(n(a.input_tokens))
                        .bind(n(a.output_tokens))
                        .bind(a.provider_cost_usd);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The ledger's rows for a key, oldest first (for operators' tools and
    /// tests; the gateway itself only appends).
    pub async fn ledger_rows(&self, key_name: &str) -> Result<Vec<crate::accounting::LedgerRow>, StorageError> {
        use sqlx::Row as _;
        let sql = "SELECT request_id, client_request_id, key_name, model, provider, upstream_model, input_tokens, output_tokens, \
                   cached_tokens, cost_usd, latency_ms, ttft_ms, attempts, outcome, error_code, created_at, unit, units FROM ledger \
                   WHERE key_name = $1 ORDER BY created_at, request_id";
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        on_pool!(self, pool => {
            let rows = sqlx::query(sql).bind(key_name).fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    Ok(crate::accounting::LedgerRow {
                        request_id: r.try_get(0)?,
                        client_request_id: r.try_get(1)?,
                        key_name: r.try_get(2)?,
                        model: r.try_get(3)?,
                        provider: r.try_get(4)?,
                        upstream_model: r.try_get(5)?,
                        input_tokens: u(r.try_get(6)?),
                        output_tokens: u(r.try_get(7)?),
                        cached_tokens: u(r.try_get(8)?),
                        cost_usd: r.try_get(9)?,
                        latency_ms: u(r.try_get(10)?),
                        ttft_ms: r.try_get::<Option<i64>, _>(11)?.map(u),
                        attempts: u32::try_from(r.try_get::<i64, _>(12)?).unwrap_or(0),
                        outcome: r.try_get(13)?,
                        error_code: r.try_get(14)?,
                        created_at: r.try_get(15)?,
                        unit: r.try_get(16)?,
                        units: r.try_get(17)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StorageError::from)
        })
    }

    /// A request's attempt rows, in order.
    pub async fn attempt_rows(&self, request_id: &str) -> Result<Vec<crate::accounting::AttemptRow>, StorageError> {
        let sql = "SELECT attempt, provider, upstream_model, outcome, input_tokens, output_tokens, provider_cost_usd \
                   FROM ledger_attempts WHERE request_id = $1 ORDER BY attempt";
        let rows: Vec<(i64, String, String, String, i64, i64, f64)> =
            on_pool!(self, pool => sqlx::query_as(sql).bind(request_id).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| crate::accounting::AttemptRow {
                attempt: u32::try_from(r.0).unwrap_or(0),
                provider: r.1,
                upstream_model: r.2,
                outcome: r.3,
                input_tokens: u64::try_from(r.4).unwrap_or(0),
                output_tokens: u64::try_from(r.5).unwrap_or(0),
                provider_cost_usd: r.6,
            })
            .collect())
    }

    /// What a key has spent, per the ledger.
    pub async fn spent(&self, key_name: &str) -> Result<f64, StorageError> {
        let sql = "SELECT COALESCE(SUM(cost_usd), 0.0) FROM ledger WHERE key_name = $1";
        let (v,): (f64,) = on_pool!(self, pool => sqlx::query_as(sql).bind(key_name).fetch_one(pool).await)?;
        Ok(v)
    }

    /// Per key and model since `since` (unix seconds), optionally for one key.
    pub async fn usage(&self, since: i64, key_name: Option<&str>) -> Result<Vec<UsageLine>, StorageError> {
        let sql = "SELECT key_name, model, COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), \
                   COALESCE(SUM(cost_usd), 0.0) FROM ledger WHERE created_at >= $1 AND ($2 IS NULL OR key_name = $2) \
                   GROUP BY key_name, model ORDER BY key_name, model";
        let rows: Vec<(String, String, i64, i64, i64, f64)> =
            on_pool!(self, pool => sqlx::query_as(sql).bind(since).bind(key_name).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|(key, model, requests, input_tokens, output_tokens, cost_usd)| UsageLine {
                key,
                model,
                requests,
                input_tokens,
                output_tokens,
                cost_usd,
            })
            .collect())
    }

    /// Is the database answering?
    pub async fn ping(&self) -> bool {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ())).is_ok()
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
    }
}

mod generations;
pub use generations::{unix_ms, Claimed, Finished, GenerationRow, NewGeneration, NOTIFY_CHANNEL};

/// Whether a pool's database numbers its placeholders (`$1`, PostgreSQL)
/// or takes them in order (`?`, SQLite).
trait Placeholders {
    const NUMBERED: bool;
}

impl Placeholders for SqlitePool {
    const NUMBERED: bool = false;
}

impl Placeholders for PgPool {
    const NUMBERED: bool = true;
}

fn numbered_placeholders<P: Placeholders>(_: &P) -> bool {
    P::NUMBERED
}

/// `{head}VALUES (?, ?, …), (…){tail}` for `rows` rows of `columns`
/// values. Written with `push_str`: sqlx's QueryBuilder formats every
/// placeholder with `write!`, which callgrind put at ~5,000 instructions a
/// request.
fn insert_sql(head: &str, columns: usize, rows: usize, tail: &str, numbered: bool) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(head.len() + tail.len() + 8 + rows * columns * 6);
    sql.push_str(head);
    sql.push_str("VALUES ");
    let mut n = 0usize;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..columns {
            if col > 0 {
                sql.push_str(", ");
            }
            n += 1;
            if numbered {
                // PostgreSQL (the replicas' store) only.
                let _ = write!(sql, "${n}");
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// Rows a statement carries at most: 18 binds a ledger row (8 an attempt),
/// well under SQLite's 32,766 and PostgreSQL's 65,535.
const ROWS_PER_STATEMENT: usize = 64;

/// Splits a batch into statements of [`ROWS_PER_STATEMENT`] rows, then of
/// 32, 16, … 1 for the rest: a handful of statement texts, each prepared
/// once and cached (a statement per batch size was prepared afresh nearly
/// every flush), and none long enough to hold SQLite's worker thread for
/// more than a fraction of a millisecond. (A 500-row statement ran for
/// milliseconds; on a gateway confined to one core, the requests waited.)
fn statements<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let take = ROWS_PER_STATEMENT.min(1 << rows.len().ilog2());
        let (head, rest) = rows.split_at(take);
        rows = rest;
        Some(head)
    })
}

#[cfg(test)]
mod statement_tests {
    #[test]
    fn statements_are_64_rows_then_powers_of_two() {
        let sizes = |n: usize| super::statements(&vec![0u8; n]).map(<[u8]>::len).collect::<Vec<_>>();
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), vec![1]);
        assert_eq!(sizes(64), vec![64]);
        assert_eq!(sizes(200), vec![64, 64, 64, 8]);
        assert_eq!(sizes(63), vec![32, 16, 8, 4, 2, 1]);
    }

    #[test]
    fn insert_statements_number_placeholders_only_for_postgres() {
        assert_eq!(super::insert_sql("INSERT INTO t (a, b) ", 2, 2, " ON CONFLICT DO NOTHING", false), "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) ON CONFLICT DO NOTHING");
        assert_eq!(super::insert_sql("INSERT INTO t (a, b) ", 2, 3, "", true), "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6)");
    }
}
