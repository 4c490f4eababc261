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
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
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

    /// Is the database answering?
    pub async fn ping(&self) -> bool {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ())).is_ok()
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
    }
}
