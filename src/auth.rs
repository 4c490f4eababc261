//! Gateway keys: who is calling, and which models they may use.
//!
//! Keys come from the config (`[[keys]]`, static) or from storage (minted by
//! `switchyard keys create`). Both are held only as SHA-256 digests; a
//! presented key is hashed, looked up by digest and confirmed with a
//! constant-time comparison, so neither the lookup nor the comparison leaks
//! how much of a guess was right.
//!
//! Stored keys are cached in memory for [`CACHE_TTL`] — found or not — so
//! the request path does not hit the database, and a key revoked through
//! any replica stops working on every replica within that time. If the
//! database cannot be reached, a key seen before keeps working from its
//! (expired) cache entry rather than failing every request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::{
    config::KeyConfig,
    error::Error,
    limits::Limits,
    storage::{Storage, StoredKey},
};

/// How long a stored key's lookup (or its absence) is trusted.
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// Cached lookups kept at most; beyond it, expired ones are dropped.
const MAX_CACHED: usize = 50_000;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub models: Vec<String>,
    pub limits: Limits,
    pub budget_usd: Option<f64>,
}

impl Principal {
    /// May this key use the public model `model`?
    pub fn may_use(&self, model: &str) -> bool {
        self.models.iter().any(|g| glob_match(g, model))
    }

    fn from_stored(k: StoredKey) -> Principal {
        Principal {
            limits: Limits::per_minute(k.requests_per_minute, k.tokens_per_minute),
            name: k.name,
            models: k.models,
            budget_usd: k.budget_usd,
        }
    }
}

/// Longest key accepted; anything longer is not one of ours.
const MAX_KEY_LEN: usize = 256;

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new gateway key: `ze_` and 40 random alphanumerics (~238 bits).
pub fn mint() -> String {
    format!("ze_{}", Alphanumeric.sample_string(&mut rand::rng(), 40))
}

struct Cached {
    principal: Option<Arc<Principal>>,
    at: Instant,
}

#[derive(Default)]
pub struct Keys {
    /// The config's keys (replaced whole on reload).
    by_digest: crate::reload::Swap<HashMap<[u8; 32], Arc<Principal>>>,
    storage: Option<Storage>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl Keys {
    pub fn from_config(keys: &[KeyConfig]) -> Keys {
        Keys {
            by_digest: crate::reload::Swap::new(Self::table(keys)),
            storage: None,
            cache: Mutex::default(),
        }
    }

    /// Replaces the config's keys: a removed key is refused from the next
    /// request on, a changed one is admitted with its new models, limits
    /// and budget.
    pub fn reload(&self, keys: &[KeyConfig]) {
        self.by_digest.store(Arc::new(Self::table(keys)));
    }

    fn table(keys: &[KeyConfig]) -> HashMap<[u8; 32], Arc<Principal>> {
        let mut by_digest = HashMap::new();
        for k in keys {
            let d = match (&k.key, &k.key_sha256) {
                (Some(key), _) => digest(key.expose()),
                (None, Some(hex_digest)) => {
                    let mut d = [0u8; 32];
                    if hex::decode_to_slice(hex_digest, &mut d).is_err() {
                        continue; // refused by Config::validate already
                    }
                    d
                }
                (None, None) => continue,
            };
            by_digest.insert(
                d,
                Arc::new(Principal {
                    name: k.name.clone(),
                    models: k.models.clone(),
                    limits: Limits::per_minute(k.requests_per_minute, k.tokens_per_minute),
                    budget_usd: k.budget_usd,
                }),
            );
        }
        by_digest
    }

    /// Also accepts keys minted into `storage`.
    pub fn with_storage(mut self, storage: Storage) -> Keys {
        self.storage = Some(storage);
        self
    }

    /// Authenticates an `Authorization` header value (`Bearer ze_...`).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Principal>, Error> {
        let value = authorization.ok_or_else(|| Error::Unauthenticated("missing key: send Authorization: Bearer <key>".into()))?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| Error::Unauthenticated("malformed Authorization header: expected Bearer <key>".into()))?;
        if !key.starts_with("ze_") || key.len() > MAX_KEY_LEN {
            return Err(Error::Unauthenticated("malformed key: gateway keys start with ze_".into()));
        }
        let d = digest(key);
        if let Some((stored, p)) = self.by_digest.load().get_key_value(&d) {
            if bool::from(stored.ct_eq(&d)) {
                return Ok(p.clone());
            }
        }
        match self.stored(&d).await? {
            Some(p) => Ok(p),
            None => Err(Error::Unauthenticated("unknown or revoked key".into())),
        }
    }

    async fn stored(&self, d: &[u8; 32]) -> Result<Option<Arc<Principal>>, Error> {
        let Some(storage) = &self.storage else { return Ok(None) };
        let now = Instant::now();
        let stale = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(d) {
                Some(c) if now.saturating_duration_since(c.at) < CACHE_TTL => return Ok(c.principal.clone()),
                Some(c) => c.principal.clone(),
                None => None,
            }
        };
        let found = match storage.find_key(&hex::encode(d)).await {
            Ok(k) => k.map(|k| Arc::new(Principal::from_stored(k))),
            Err(e) => {
                tracing::error!("key lookup failed: {e}");
                return match stale {
                    Some(p) => Ok(Some(p)),
                    None => Err(Error::Internal("the key store is unavailable".into())),
                };
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| now.saturating_duration_since(c.at) < CACHE_TTL);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(*d, Cached { principal: found.clone(), at: now });
        Ok(found)
    }
}

/// Glob match on public model ids: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // The usual patterns, without collecting characters.
    if pattern == "*" {
        return true;
    }
    if !pattern.contains(['*', '?']) {
        return pattern == text;
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last `*`: linear in
    // practice, no recursion, so a hostile pattern cannot blow the stack.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn globs() {
        assert!(glob_match("*", "gpt-4o-mini"));
        assert!(glob_match("gpt-*", "gpt-4o-mini"));
        assert!(glob_match("gpt-4o-?ini", "gpt-4o-mini"));
        assert!(glob_match("*mini", "gpt-4o-mini"));
        assert!(!glob_match("claude-*", "gpt-4o-mini"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
        assert!(glob_match("g*-*-m*i", "gpt-4o-mini"));
    }

    #[tokio::test]
    async fn keys_by_plaintext_or_digest() {
        let plain = "ze_plaintext_key_1";
        let hashed = "ze_hashed_key_2222";
        let keys = Keys::from_config(&[
            KeyConfig { name: "a".into(), key: Some(Secret::new(plain)), key_sha256: None, models: vec!["gpt-*".into()], requests_per_minute: None, tokens_per_minute: None, budget_usd: None },
            KeyConfig { name: "b".into(), key: None, key_sha256: Some(hex::encode(digest(hashed))), models: vec!["*".into()], requests_per_minute: None, tokens_per_minute: None, budget_usd: None },
        ]);
        assert_eq!(keys.authenticate(Some(&format!("Bearer {plain}"))).await.unwrap().name, "a");
        assert_eq!(keys.authenticate(Some(&format!("Bearer {hashed}"))).await.unwrap().name, "b");
        for bad in [None, Some("Bearer"), Some("Basic x"), Some("Bearer sk-123"), Some("Bearer ze_wrong")] {
            assert_eq!(keys.authenticate(bad).await.unwrap_err().code(), "unauthenticated");
        }
        assert!(mint().starts_with("ze_") && mint().len() == 43 && mint() != mint());
    }
}
