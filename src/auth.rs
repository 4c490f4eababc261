//! Gateway keys: who is calling, and which models they may use.
//!
//! Keys are held only as SHA-256 digests (config may give the digest itself
//! as `key_sha256`). A presented key is hashed, looked up by digest and
//! confirmed with a constant-time comparison, so neither the lookup nor the
//! comparison leaks how much of a guess was right.

use std::{collections::HashMap, sync::Arc};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{config::KeyConfig, error::Error};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub budget_usd: Option<f64>,
}

impl Principal {
    /// May this key use the public model `model`?
    pub fn may_use(&self, model: &str) -> bool {
        self.models.iter().any(|g| glob_match(g, model))
    }
}

/// Longest key accepted; anything longer is not one of ours.
const MAX_KEY_LEN: usize = 256;

#[derive(Default)]
pub struct Keys {
    by_digest: HashMap<[u8; 32], Arc<Principal>>,
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Keys {
    pub fn from_config(keys: &[KeyConfig]) -> Keys {
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
                    requests_per_minute: k.requests_per_minute,
                    tokens_per_minute: k.tokens_per_minute,
                    budget_usd: k.budget_usd,
                }),
            );
        }
        Keys { by_digest }
    }

    /// Authenticates an `Authorization` header value (`Bearer ze_...`).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Principal>, Error> {
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
        match self.by_digest.get_key_value(&d) {
            Some((stored, p)) if bool::from(stored.ct_eq(&d)) => Ok(p.clone()),
            _ => Err(Error::Unauthenticated("unknown or revoked key".into())),
        }
    }
}

/// Glob match on public model ids: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
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

    #[test]
    fn keys_by_plaintext_or_digest() {
        let plain = "ze_plaintext_key_1";
        let hashed = "ze_hashed_key_2222";
        let keys = Keys::from_config(&[
            KeyConfig { name: "a".into(), key: Some(Secret::new(plain)), key_sha256: None, models: vec!["gpt-*".into()], requests_per_minute: None, tokens_per_minute: None, budget_usd: None },
            KeyConfig { name: "b".into(), key: None, key_sha256: Some(hex::encode(digest(hashed))), models: vec!["*".into()], requests_per_minute: None, tokens_per_minute: None, budget_usd: None },
        ]);
        assert_eq!(keys.authenticate(Some(&format!("Bearer {plain}"))).unwrap().name, "a");
        assert_eq!(keys.authenticate(Some(&format!("Bearer {hashed}"))).unwrap().name, "b");
        for bad in [None, Some("Bearer"), Some("Basic x"), Some("Bearer sk-123"), Some("Bearer ze_wrong")] {
            assert_eq!(keys.authenticate(bad).unwrap_err().code(), "unauthenticated");
        }
    }
}
