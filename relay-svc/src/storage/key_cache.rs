//! API keys the relay has looked up lately, so an enterprise's calls do not
//! each read `api_keys` (a statement on the accept path of every message).
//!
//! Only keys found live are kept, with their own expiry (a rotation's
//! overlap ends exactly when it should). This replica's writes to the keys —
//! a new enterprise, a key added or rotated, a key revoked — empty the cache
//! in the same call; another replica's reach it within [`KEY_CACHE_TTL`],
//! after which an entry is looked up again. Unknown keys are never kept, so
//! a new key works at once everywhere and guessing fills nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a key found live is trusted without reading it again: the most a
/// revocation made on another replica takes to reach this one.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Keys kept at most; the cache is emptied when full (a burst of many
/// enterprises' first calls, not a steady state).
const KEYS_KEPT: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    keys: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    enterprise_id: String,
    /// The key's own expiry (unix ms), if it has one.
    expires_at: Option<i64>,
    read_at: Instant,
}

impl KeyCache {
    /// The enterprise of the live key hashing to `key_hash` at `now`, if it
    /// was read within the time to live; `None`: read it.
    pub(crate) fn get(&self, key_hash: &str, now: i64) -> Option<String> {
        let keys = self.keys.lock().ok()?;
        let entry = keys.get(key_hash)?;
        let fresh = entry.read_at.elapsed() < KEY_CACHE_TTL;
        let live = entry.expires_at.is_none_or(|at| at > now);
        (fresh && live).then(|| entry.enterprise_id.clone())
    }

    /// Keeps what was just read: the key's enterprise and expiry.
    pub(crate) fn put(&self, key_hash: &str, enterprise_id: &str, expires_at: Option<i64>) {
        if let Ok(mut keys) = self.keys.lock() {
            if keys.len() >= KEYS_KEPT {
                keys.clear();
            }
            keys.insert(
                key_hash.to_owned(),
                Entry {
                    enterprise_id: enterprise_id.to_owned(),
                    expires_at,
                    read_at: Instant::now(),
                },
            );
        }
    }

    /// The keys changed (on this replica): forget everything.
    pub(crate) fn clear(&self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_live_keys_until_they_expire_or_change() {
        let cache = KeyCache::default();
        assert_eq!(cache.get("h", 0), None);
        cache.put("h", "ent_1", Some(100));
        assert_eq!(cache.get("h", 99).as_deref(), Some("ent_1"));
        // The key's own expiry holds without a read.
        assert_eq!(cache.get("h", 100), None);
        cache.put("g", "ent_2", None);
        cache.clear();
        assert_eq!(cache.get("g", 0), None);
    }
}
