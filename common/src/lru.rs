//! A least-recently-used map bounded by the total size of its values, for the workers' resident
//! feature and embedding caches and the gateway's in-memory feature cache.

use std::collections::HashMap;
use std::hash::Hash;

/// LRU map whose capacity is a number of bytes; each entry states its own size.
#[derive(Debug)]
pub struct ByteLru<K, V> {
    entries: HashMap<K, Entry<V>>,
    capacity_bytes: usize,
    used_bytes: usize,
    clock: u64,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    bytes: usize,
    last_used: u64,
}

impl<K: Eq + Hash + Clone, V: Clone> ByteLru<K, V> {
    pub fn new(capacity_bytes: usize) -> Self {
        Self { entries: HashMap::new(), capacity_bytes, used_bytes: 0, clock: 0 }
    }

    /// The value for `key`, marking it as most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|entry| {
            entry.last_used = clock;
            entry.value.clone()
        })
    }

    /// Inserts or replaces `key`, evicting the least recently used entries until it fits. A value
    /// larger than the whole capacity is not kept.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) {
        self.remove(&key);
        if bytes > self.capacity_bytes {
            return;
        }
        while self.used_bytes + bytes > self.capacity_bytes {
            // Linear scan: the caches hold hundreds of large entries, not millions of small ones.
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| key.clone())
                .expect("used bytes > 0 implies an entry. This is a bug.");
            self.remove(&oldest);
        }
        self.clock += 1;
        self.used_bytes += bytes;
        self.entries.insert(key, Entry { value, bytes, last_used: self.clock });
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.used_bytes -= entry.bytes;
        Some(entry.value)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
}

/// A byte-bounded LRU shared by request handlers (a worker's resident features or embeddings),
/// reporting hits in `lookups_metric{hit}` and its size in `bytes_metric`.
pub struct ResidentCache<V> {
    entries: std::sync::Mutex<ByteLru<String, V>>,
    lookups_metric: &'static str,
    bytes_metric: &'static str,
}

impl<V: Clone> ResidentCache<V> {
    pub fn new(capacity_bytes: usize, lookups_metric: &'static str, bytes_metric: &'static str) -> Self {
        Self { entries: std::sync::Mutex::new(ByteLru::new(capacity_bytes)), lookups_metric, bytes_metric }
    }

    pub fn get(&self, key: &str) -> Option<V> {
        let hit = self.entries.lock().expect("LRU lock poisoned. This is a bug.").get(&key.to_string());
        metrics::counter!(self.lookups_metric, "hit" => hit.is_some().to_string()).increment(1);
        hit
    }

    pub fn insert(&self, key: &str, value: V, bytes: usize) {
        let mut entries = self.entries.lock().expect("LRU lock poisoned. This is a bug.");
        entries.insert(key.to_string(), value, bytes);
        metrics::gauge!(self.bytes_metric).set(entries.used_bytes() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let mut lru = ByteLru::new(10);
        lru.insert("a", 1, 4);
        lru.insert("b", 2, 4);
        assert_eq!(lru.get(&"a"), Some(1)); // "b" is now the oldest
        lru.insert("c", 3, 4);
        assert!(!lru.contains(&"b"));
        assert_eq!((lru.get(&"a"), lru.get(&"c")), (Some(1), Some(3)));
        assert_eq!(lru.used_bytes(), 8);
        lru.insert("a", 10, 6); // replacing frees the old size first
        assert_eq!(lru.used_bytes(), 10);
        assert_eq!(lru.get(&"a"), Some(10));
        lru.insert("huge", 0, 11);
        assert!(!lru.contains(&"huge"));
        assert_eq!(lru.remove(&"c"), Some(3));
        assert_eq!(lru.len(), 1);
    }
}
