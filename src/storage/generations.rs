//! Generation jobs in storage: created by a request, claimed by a worker
//! with a lease, finished (fenced on that lease), read by their owner.
//!
//! Claiming is one statement: PostgreSQL picks the oldest runnable job with
//! `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never block on or
//! take the same row; SQLite serialises writers, so the same statement
//! without the lock clause is equally exclusive.

use super::{unix_now, Storage, StorageError};

/// The channel PostgreSQL `NOTIFY`s carry job changes on (payload: `"<id>
/// <status>"`).
pub const NOTIFY_CHANNEL: &str = "switchyard_generations";

/// A job as its owner reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRow {
    pub id: String,
    pub key_name: String,
    pub model: String,
    pub status: String,
    pub spec: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub usage: Option<String>,
    pub created_at: i64,
    pub completed_at: Option<i64>,
}

/// A job a worker has just taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub id: String,
    pub key_name: String,
    pub model: String,
    pub spec: String,
    /// How many times a worker has taken it, this time included.
    pub claims: i64,
    pub client_request_id: Option<String>,
    pub created_at: i64,
}

pub struct NewGeneration<'a> {
    pub id: &'a str,
    pub key_name: &'a str,
    pub model: &'a str,
    pub spec: &'a str,
    pub client_request_id: Option<&'a str>,
}

/// How a job ended.
pub struct Finished<'a> {
    /// `completed` or `failed`.
    pub status: &'a str,
    pub output: Option<&'a str>,
    pub error: Option<&'a str>,
    pub usage: Option<&'a str>,
    /// Media kept by the gateway: index, content type, bytes.
    pub media: &'a [(u32, String, Vec<u8>)],
}

type GenTuple = (String, String, String, String, String, Option<String>, Option<String>, Option<String>, i64, Option<i64>);
type ClaimTuple = (String, String, String, String, i64, Option<String>, i64);

const CLAIM_PG: &str = "UPDATE generations SET status = 'running', lease_owner = $1, lease_until = $2, claims = claims + 1 \
    WHERE id = (SELECT id FROM generations WHERE status IN ('queued', 'running') AND (lease_until IS NULL OR lease_until < $3) \
    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
    RETURNING id, key_name, model, spec, claims, client_request_id, created_at";
const CLAIM_SQLITE: &str = "UPDATE generations SET status = 'running', lease_owner = $1, lease_until = $2, claims = claims + 1 \
    WHERE id = (SELECT id FROM generations WHERE status IN ('queued', 'running') AND (lease_until IS NULL OR lease_until < $3) \
    ORDER BY created_at LIMIT 1) \
    RETURNING id, key_name, model, spec, claims, client_request_id, created_at";

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Storage {
    pub async fn create_generation(&self, g: &NewGeneration<'_>) -> Result<i64, StorageError> {
        let created = unix_now();
        let sql = "INSERT INTO generations (id, key_name, model, status, spec, created_at, client_request_id) \
                   VALUES ($1, $2, $3, 'queued', $4, $5, $6)";
        on_pool!(self, pool => sqlx::query(sql)
            .bind(g.id)
            .bind(g.key_name)
            .bind(g.model)
            .bind(g.spec)
            .bind(created)
            .bind(g.client_request_id)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(created)
    }

    /// The job `id` if it belongs to `key_name`.
    pub async fn generation(&self, id: &str, key_name: &str) -> Result<Option<GenerationRow>, StorageError> {
        let sql = "SELECT id, key_name, model, status, spec, output, error, usage, created_at, completed_at \
                   FROM generations WHERE id = $1 AND key_name = $2";
        let row: Option<GenTuple> = on_pool!(self, pool => sqlx::query_as(sql).bind(id).bind(key_name).fetch_optional(pool).await)?;
        Ok(row.map(|r| GenerationRow {
            id: r.0,
            key_name: r.1,
            model: r.2,
            status: r.3,
            spec: r.4,
            output: r.5,
            error: r.6,
            usage: r.7,
            created_at: r.8,
            completed_at: r.9,
        }))
    }

    /// Takes the oldest runnable job (queued, or running under a lease that
    /// ran out) for `owner` until `lease_until_ms`.
    pub async fn claim_generation(&self, owner: &str, lease_until_ms: i64) -> Result<Option<Claimed>, StorageError> {
        let now = unix_ms();
        let row: Option<ClaimTuple> = match self {
            Storage::Postgres(pool) => sqlx::query_as(CLAIM_PG).bind(owner).bind(lease_until_ms).bind(now).fetch_optional(pool).await?,
            Storage::Sqlite(pool) => sqlx::query_as(CLAIM_SQLITE).bind(owner).bind(lease_until_ms).bind(now).fetch_optional(pool).await?,
        };
        Ok(row.map(|r| Claimed {
            id: r.0,
            key_name: r.1,
            model: r.2,
            spec: r.3,
            claims: r.4,
            client_request_id: r.5,
            created_at: r.6,
        }))
    }

    /// Extends `owner`'s lease; `false` when the lease is no longer its own.
    pub async fn renew_generation(&self, id: &str, owner: &str, lease_until_ms: i64) -> Result<bool, StorageError> {
        let sql = "UPDATE generations SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND status = 'running'";
        let n = on_pool!(self, pool => sqlx::query(sql).bind(lease_until_ms).bind(id).bind(owner).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// Puts a job `owner` holds back in the queue (this replica is stopping).
    pub async fn release_generation(&self, id: &str, owner: &str) -> Result<bool, StorageError> {
        let sql = "UPDATE generations SET status = 'queued', lease_owner = NULL, lease_until = NULL \
                   WHERE id = $1 AND lease_owner = $2 AND status = 'running'";
        let n = on_pool!(self, pool => sqlx::query(sql).bind(id).bind(owner).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// Ends a job `owner` holds, with its media, in one transaction; `false`
    /// (and nothing written) when the lease is no longer its own.
    pub async fn finish_generation(&self, id: &str, owner: &str, f: &Finished<'_>) -> Result<bool, StorageError> {
        let sql = "UPDATE generations SET status = $1, output = $2, error = $3, usage = $4, completed_at = $5, \
                   lease_owner = NULL, lease_until = NULL WHERE id = $6 AND lease_owner = $7 AND status = 'running'";
        let media = "INSERT INTO generation_media (generation_id, n, content_type, data) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (generation_id, n) DO NOTHING";
        let done = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let n = sqlx::query(sql)
                .bind(f.status)
                .bind(f.output)
                .bind(f.error)
                .bind(f.usage)
                .bind(unix_now())
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n != 1 {
                tx.rollback().await?;
                false
            } else {
                for (i, content_type, data) in f.media {
                    sqlx::query(media).bind(id).bind(i64::from(*i)).bind(content_type).bind(data.as_slice()).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                true
            }
        });
        Ok(done)
    }

    /// Media kept for job `id`, if the job belongs to `key_name`.
    pub async fn generation_media(&self, id: &str, n: u32, key_name: &str) -> Result<Option<(String, Vec<u8>)>, StorageError> {
        let sql = "SELECT m.content_type, m.data FROM generation_media m JOIN generations g ON g.id = m.generation_id \
                   WHERE m.generation_id = $1 AND m.n = $2 AND g.key_name = $3";
        let row: Option<(String, Vec<u8>)> =
            on_pool!(self, pool => sqlx::query_as(sql).bind(id).bind(i64::from(n)).bind(key_name).fetch_optional(pool).await)?;
        Ok(row)
    }

    /// Tells every replica that job `id` changed (PostgreSQL only; SQLite
    /// is one process, told in memory).
    pub async fn notify_generation(&self, id: &str, status: &str) -> Result<(), StorageError> {
        if let Storage::Postgres(pool) = self {
            sqlx::query("SELECT pg_notify($1, $2)").bind(NOTIFY_CHANNEL).bind(format!("{id} {status}")).execute(pool).await?;
        }
        Ok(())
    }
}
