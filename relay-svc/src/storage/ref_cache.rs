//! The refs the relay resolved lately for targeted messages — each
//! enterprise's ref with its person and their contracts — so a batch of
//! accepts does not read `registrations` and `contracts` for every ref
//! again (a statement per batch that cost ~8 µs per message).
//!
//! Kept current by the registries' own writes: every change to
//! `registrations` or `contracts`, whatever the write path and whichever
//! replica made it, moves `registry_version` in its transaction (triggers,
//! migration 0017). A batch reads the version first, in its transaction;
//! what the cache holds was read at one version and is forgotten as soon
//! as a batch sees another. What a batch then reads of the registries is
//! at least as new as the version it read, so an entry is never older than
//! the version it is kept under. A ref not registered is never kept, so a
//! new registration works at once and unknown refs fill nothing.

use std::collections::HashMap;
use std::sync::Mutex;

/// A ref's contracts: (user, carrier, primary); none for a person
/// registered with no contract.
pub(crate) type Contracts = Vec<(String, String, bool)>;

/// Refs kept at most; the cache is emptied when full.
const REFS_KEPT: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct RefCache {
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// The registries' version everything below was read at.
    version: i64,
    /// Per enterprise, per ref (looked up by borrowed keys, with no
    /// allocation on the accept path).
    refs: HashMap<String, HashMap<String, Contracts>>,
    /// How many refs `refs` holds in all.
    len: usize,
}

impl RefCache {
    /// What was read of `enterprise_id`'s `user_ref` while the registries
    /// were at `version` (the version a batch just read); `None`: read it.
    /// Another version forgets everything kept.
    pub(crate) fn get(
        &self,
        version: i64,
        enterprise_id: &str,
        user_ref: &str,
    ) -> Option<Contracts> {
        let mut kept = self.kept.lock().ok()?;
        kept.move_to(version);
        if kept.version != version {
            return None; // a batch that read an older version
        }
        kept.refs.get(enterprise_id)?.get(user_ref).cloned()
    }

    /// Keeps what a batch read of a registered ref after reading `version`.
    pub(crate) fn put(
        &self,
        version: i64,
        enterprise_id: &str,
        user_ref: &str,
        contracts: &Contracts,
    ) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        kept.move_to(version);
        if kept.version != version {
            return;
        }
        if kept.len >= REFS_KEPT {
            kept.forget();
        }
        let added = kept
            .refs
            .entry(enterprise_id.to_owned())
            .or_default()
            .insert(user_ref.to_owned(), contracts.clone())
            .is_none();
        kept.len += usize::from(added);
    }
}

impl Kept {
    /// Forgets everything when the registries moved past the version it
    /// was read at (never back: versions only grow).
    fn move_to(&mut self, version: i64) {
        if version > self.version {
            self.forget();
            self.version = version;
        }
    }

    fn forget(&mut self) {
        self.refs.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(carrier: &str) -> Contracts {
        vec![("u1".to_owned(), carrier.to_owned(), true)]
    }

    #[test]
    fn keeps_refs_only_while_the_registries_stay_at_their_version() {
        let cache = RefCache::default();
        assert_eq!(cache.get(3, "ent", "ref"), None);
        cache.put(3, "ent", "ref", &contract("a"));
        assert_eq!(cache.get(3, "ent", "ref"), Some(contract("a")));
        assert_eq!(cache.get(3, "other", "ref"), None, "per enterprise");
        // The registries moved: nothing read before is trusted.
        assert_eq!(cache.get(4, "ent", "ref"), None);
        assert_eq!(cache.get(4, "ent", "ref"), None);
        // Read again at the new version (by a batch that read it).
        cache.put(4, "ent", "ref", &contract("b"));
        assert_eq!(cache.get(4, "ent", "ref"), Some(contract("b")));
        // A batch that read an older version neither gets nor keeps anything.
        assert_eq!(cache.get(3, "ent", "ref"), None);
        cache.put(3, "ent", "ref", &contract("a"));
        assert_eq!(cache.get(4, "ent", "ref"), Some(contract("b")));
    }

    #[test]
    fn a_person_with_no_contract_is_kept_as_such() {
        let cache = RefCache::default();
        cache.put(1, "ent", "ref", &Vec::new());
        assert_eq!(cache.get(1, "ent", "ref"), Some(Vec::new()));
    }
}
