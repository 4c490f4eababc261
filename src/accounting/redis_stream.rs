//! The ledger's shared path, for replicas: with Redis configured, a
//! request's entry is `XADD`ed to one stream before the client's last byte —
//! durable beyond any one replica (a replica killed with SIGKILL, whose disk
//! goes with it, loses nothing) — and every replica drains the stream into
//! the database in batches through one consumer group. Entries delivered to
//! a consumer that died unacknowledged are claimed by another after
//! [`CLAIM_IDLE`]. Inserts are idempotent by request id, so an entry drained
//! twice (claimed after a slow insert) still lands once.
//!
//! If Redis cannot take an entry, the local journal does (`mod.rs`).

use std::time::Duration;

use redis::{
    aio::{ConnectionManager, MultiplexedConnection},
    streams::{StreamAutoClaimReply, StreamId, StreamReadReply},
};
use tokio::time::timeout;

use super::Entry;
use crate::storage::Storage;

const GROUP: &str = "ledger-writers";
/// How long an entry may sit with a silent consumer before another takes it.
pub const CLAIM_IDLE: Duration = Duration::from_secs(5);
const APPEND_TIMEOUT: Duration = Duration::from_millis(250);
const BATCH: usize = 500;

pub struct RedisLedger {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    stream: String,
}

/// The stream for a database: replicas sharing a database share a stream,
/// and gateways writing to different databases never drain each other's.
pub fn stream_key(storage_url: &str) -> String {
    let digest = crate::auth::digest(storage_url);
    format!("switchyard:ledger:{}", hex::encode(&digest[..8]))
}

impl RedisLedger {
    pub fn new(url: &str, stream: String) -> Result<RedisLedger, redis::RedisError> {
        Ok(RedisLedger {
            client: redis::Client::open(url)?,
            conn: tokio::sync::Mutex::new(None),
            stream,
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(APPEND_TIMEOUT))
            .set_response_timeout(Some(APPEND_TIMEOUT))
            .set_number_of_retries(1);
        let c = timeout(APPEND_TIMEOUT * 2, self.client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Appends one entry; `Ok` once Redis has it.
    pub async fn append(&self, entry: &Entry) -> Result<(), String> {
        let mut json = Vec::with_capacity(768);
        super::json_line::write_entry(&mut json, entry);
        let mut conn = self.connection().await?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream).arg("*").arg("e").arg(json);
        let _: String = timeout(APPEND_TIMEOUT, cmd.query_async(&mut conn))
            .await
            .map_err(|_| "XADD timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Drains the stream into `storage` until the task is dropped.
    pub async fn drain(url: String, stream: String, storage: Storage) {
        let consumer = format!("{}-{}", std::process::id(), rand::random::<u32>());
        loop {
            // Its own connection: a blocking read must not hold up appends.
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(10)));
            let conn = match redis::Client::open(url.as_str()) {
                Ok(c) => c.get_multiplexed_async_connection_with_config(&config).await,
                Err(e) => Err(e),
            };
            match conn {
                Ok(mut conn) => {
                    if let Err(e) = drain_with(&mut conn, &storage, &stream, &consumer).await {
                        tracing::warn!("ledger stream drain: {e}; reconnecting");
                    }
                }
                Err(e) => tracing::debug!("ledger stream: Redis unreachable: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn entries(ids: &[StreamId]) -> Vec<Entry> {
    ids.iter()
        .filter_map(|id| match id.map.get("e") {
            Some(redis::Value::BulkString(b)) => serde_json::from_slice(b).ok(),
            _ => None,
        })
        .collect()
}

/// Inserts a batch, then acknowledges and deletes it from the stream.
async fn settle(conn: &mut MultiplexedConnection, storage: &Storage, stream: &str, ids: &[StreamId]) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    let batch = entries(ids);
    if !batch.is_empty() {
        storage.insert_entries(&batch).await.map_err(|e| e.to_string())?;
    }
    let keys: Vec<&str> = ids.iter().map(|i| i.id.as_str()).collect();
    let mut ack = redis::cmd("XACK");
    ack.arg(stream).arg(GROUP).arg(&keys);
    let _: i64 = ack.query_async(conn).await.map_err(|e| e.to_string())?;
    let mut del = redis::cmd("XDEL");
    del.arg(stream).arg(&keys);
    let _: i64 = del.query_async(conn).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn drain_with(conn: &mut MultiplexedConnection, storage: &Storage, stream: &str, consumer: &str) -> Result<(), String> {
    let mut create = redis::cmd("XGROUP");
    create.arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM");
    if let Err(e) = create.query_async::<()>(conn).await {
        if !e.to_string().contains("BUSYGROUP") {
            return Err(e.to_string());
        }
    }
    loop {
        // Entries a dead consumer was given and never acknowledged.
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim
            .arg(stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(CLAIM_IDLE.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH);
        let claimed: StreamAutoClaimReply = claim.query_async(conn).await.map_err(|e| e.to_string())?;
        settle(conn, storage, stream, &claimed.claimed).await?;
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">");
        let reply: Option<StreamReadReply> = read.query_async(conn).await.map_err(|e| e.to_string())?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            settle(conn, storage, stream, &key.ids).await?;
        }
    }
}
