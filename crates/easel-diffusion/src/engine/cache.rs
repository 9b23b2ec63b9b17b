//! The engine's model cache: loaded models kept least-recently-used first
//! within a memory budget (moved here from the server, so the CLI and the
//! server share one cache policy).

/// A model in the cache: its key (the model reference it was loaded by) and
/// the bytes its weights hold (see [`super::memory::estimate_model_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// The model reference the entry was loaded by.
    pub key: String,
    /// Estimated memory of the loaded weights, in bytes.
    pub bytes: u64,
}

/// A least-recently-used cache of loaded models within a byte budget.
///
/// The budget is a soft limit on the sum of the entries' estimated bytes:
/// [`ModelCache::make_room`] evicts least recently used entries before an
/// insert; a single entry larger than the budget still loads, alone.
pub struct ModelCache<T> {
    budget: u64,
    /// Most recently used last.
    entries: Vec<(String, T, u64)>,
}

impl<T> ModelCache<T> {
    /// An empty cache holding at most `budget` bytes (estimated).
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            entries: Vec::new(),
        }
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The entry for `key`, marked most recently used.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        let pos = self.entries.iter().position(|(k, _, _)| k == key)?;
        let entry = self.entries.remove(pos);
        self.entries.push(entry);
        self.entries.last_mut().map(|(_, v, _)| v)
    }

    /// The value under `key`, marked most recently used.
    pub fn get(&mut self, key: &str) -> Option<&T> {
        self.get_mut(key).map(|v| &*v)
    }

    /// Whether `key` is cached (without marking it used).
    pub fn contains(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _, _)| k == key)
    }

    /// Unload least recently used entries until `bytes` more fit the budget
    /// (all of them when it never fits). Returns the keys unloaded.
    pub fn make_room(&mut self, bytes: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        while !self.entries.is_empty() && self.used() + bytes > self.budget {
            let (key, _, _) = self.entries.remove(0);
            evicted.push(key);
        }
        if !evicted.is_empty() {
            crate::os_memory::release_freed_memory();
        }
        evicted
    }

    /// Unload `key`; whether it was cached.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _, _)| k != key);
        self.entries.len() != before
    }

    /// Insert `value` for `key` as most recently used.
    pub fn insert(&mut self, key: String, value: T, bytes: u64) {
        self.entries.retain(|(k, _, _)| *k != key);
        self.entries.push((key, value, bytes));
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.entries.iter().map(|(_, _, b)| b).sum()
    }

    /// `(key, bytes)`, most recently used first.
    pub fn list(&self) -> Vec<CachedModel> {
        self.entries
            .iter()
            .rev()
            .map(|(k, _, b)| CachedModel {
                key: k.clone(),
                bytes: *b,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_cache_evicts_least_recently_used_within_budget() {
        let mut cache = ModelCache::new(100);
        cache.insert("a".into(), 1, 40);
        cache.insert("b".into(), 2, 40);
        assert_eq!(cache.get("a"), Some(&1));
        // c needs 40: b (least recently used) goes, a stays.
        assert_eq!(cache.make_room(40), ["b"]);
        cache.insert("c".into(), 3, 40);
        let keys: Vec<String> = cache.list().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["c", "a"]);
        // Something larger than the budget empties the cache.
        assert_eq!(cache.make_room(500), ["a", "c"]);
        assert_eq!(cache.used(), 0);
    }
}
