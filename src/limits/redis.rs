//! The Redis backend: the GCRA of `gcra.rs` as one Lua script, so checking
//! both limits and counting the request is one atomic step on the server,
//! with the server's clock — exact however many replicas ask at once.

use std::{sync::Mutex, time::Duration};

use redis::{aio::ConnectionManager, Script};
use tokio::time::{timeout, Instant};

use super::{gcra::Decision, Limits, Rate, Verdict};

/// How long a limit check may wait on Redis before the local figures
/// answer instead.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How often a lost connection is retried.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// KEYS: request TAT, token TAT. ARGV: peek, then (limit, period µs, cost)
/// for requests and for tokens (limit 0: no such limit).
/// Returns: allowed, then (remaining, reset µs, retry µs) for each.
const CHECK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local peek = ARGV[1] == '1'
local allowed = 1
local lim = {}
for i = 1, 2 do
  local limit = tonumber(ARGV[2 + (i - 1) * 3])
  if limit > 0 then
    local period = tonumber(ARGV[3 + (i - 1) * 3])
    local cost = math.min(tonumber(ARGV[4 + (i - 1) * 3]), limit)
    local interval = period / limit
    local tat = now
    local stored = redis.call('GET', KEYS[i])
    if stored then tat = math.max(tonumber(stored), now) end
    local new = tat + cost * interval
    local retry = 0
    if new - period > now then
      allowed = 0
      retry = new - period - now
    end
    lim[i] = {tat = tat, new = new, period = period, interval = interval, retry = retry}
  end
end
local out = {allowed, 0, 0, 0, 0, 0, 0}
for i = 1, 2 do
  local l = lim[i]
  if l then
    -- Admitted: figures after this request. Refused: as they stand.
    local shown = l.tat
    if allowed == 1 then shown = l.new end
    out[2 + (i - 1) * 3] = math.max(0, math.floor((l.period - (shown - now)) / l.interval))
    out[3 + (i - 1) * 3] = math.ceil(shown - now)
    out[4 + (i - 1) * 3] = math.ceil(l.retry)
    if allowed == 1 and not peek then
      redis.call('SET', KEYS[i], string.format('%.0f', l.new), 'PX', math.ceil(l.period / 1000) + 1000)
    end
  end
end
return out
";

/// KEYS: token TAT. ARGV: limit, period µs, delta (may be negative).
const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then tat = math.max(tonumber(stored), now) end
tat = math.max(now, tat + tonumber(ARGV[3]) * period / limit)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(period / 1000) + 1000)
return 1
";

pub struct RedisLimiter {
    client: redis::Client,
    /// Held across a connect, so concurrent first requests wait for one
    /// connection instead of each falling back to local figures.
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    last_connect: Mutex<Option<Instant>>,
    /// After a failure, requests skip Redis for a while rather than each
    /// waiting out a timeout while it is down.
    failed_at: Mutex<Option<Instant>>,
    check: Script,
    adjust: Script,
}

impl RedisLimiter {
    pub fn new(url: &str) -> Result<Self, redis::RedisError> {
        Ok(RedisLimiter {
            client: redis::Client::open(url)?,
            conn: tokio::sync::Mutex::new(None),
            last_connect: Mutex::new(None),
            failed_at: Mutex::new(None),
            check: Script::new(CHECK),
            adjust: Script::new(ADJUST),
        })
    }

    /// The shared connection, connecting (at most once a second) if needed.
    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        {
            let mut last = self.last_connect.lock().map_err(|_| "poisoned")?;
            if last.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                return Err("not connected".into());
            }
            *last = Some(Instant::now());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1);
        let conn = timeout(CALL_TIMEOUT * 2, self.client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn backing_off(&self) -> bool {
        self.failed_at.lock().ok().and_then(|t| *t).is_some_and(|t| t.elapsed() < RECONNECT_EVERY)
    }

    fn note<T>(&self, r: Result<T, String>) -> Result<T, String> {
        if let Ok(mut f) = self.failed_at.lock() {
            *f = if r.is_ok() { None } else { Some(Instant::now()) };
        }
        r
    }

    pub async fn check(&self, key: &str, limits: &Limits, token_cost: u64, peek: bool) -> Result<Verdict, String> {
        if self.backing_off() {
            return Err("backing off after a failure".into());
        }
        let r = self.try_check(key, limits, token_cost, peek).await;
        self.note(r)
    }

    async fn try_check(&self, key: &str, limits: &Limits, token_cost: u64, peek: bool) -> Result<Verdict, String> {
        let mut conn = self.connection().await?;
        let mut inv = self.check.key(format!("switchyard:rl:{{{key}}}:req"));
        inv.key(format!("switchyard:rl:{{{key}}}:tok")).arg(if peek { "1" } else { "0" });
        for (rate, cost) in [(limits.requests, u64::from(!peek)), (limits.tokens, if peek { 0 } else { token_cost })] {
            let r = rate.unwrap_or(Rate { limit: 0, period_us: 1 });
            inv.arg(if rate.is_some() { r.limit } else { 0 }).arg(r.period_us).arg(cost);
        }
        let out: Vec<i64> = timeout(CALL_TIMEOUT, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if out.len() != 7 {
            return Err(format!("unexpected script answer {out:?}"));
        }
        let allowed = out[0] == 1;
        let decision = |rate: Option<Rate>, at: usize| {
            rate.map(|r| Decision {
                allowed,
                limit: r.limit,
                remaining: out[at].max(0) as u64,
                reset_us: out[at + 1].max(0) as u64,
                retry_after_us: out[at + 2].max(0) as u64,
                tat_us: 0.0,
            })
        };
        Ok(Verdict {
            allowed,
            requests: decision(limits.requests, 1),
            tokens: decision(limits.tokens, 4),
        })
    }

    pub async fn reconcile(&self, key: &str, rate: Rate, delta: i64) -> Result<(), String> {
        if self.backing_off() {
            return Err("backing off after a failure".into());
        }
        let r = self.try_reconcile(key, rate, delta).await;
        self.note(r)
    }

    async fn try_reconcile(&self, key: &str, rate: Rate, delta: i64) -> Result<(), String> {
        let mut conn = self.connection().await?;
        let mut inv = self.adjust.key(format!("switchyard:rl:{{{key}}}:tok"));
        inv.arg(rate.limit).arg(rate.period_us).arg(delta);
        let _: i64 = timeout(CALL_TIMEOUT, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
