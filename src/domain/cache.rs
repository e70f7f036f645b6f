//! A small read-through cache of entities by id.
//!
//! Correctness over cleverness: every invalidation bumps a generation, and a
//! value read from the database is only stored if no invalidation happened
//! since the read began. That closes the classic race in which a slow reader
//! puts back the value a concurrent writer just replaced. When full, the cache
//! is emptied rather than tracking recency: it exists to absorb hot-key read
//! load, and a cold start costs one query per key.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::RwLock;

#[derive(Debug)]
pub struct Cache<V> {
    map: RwLock<HashMap<i64, Arc<V>>>,
    generation: AtomicU64,
    capacity: usize,
}

impl<V> Cache<V> {
    pub fn new(capacity: usize) -> Self {
        Cache {
            map: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            capacity,
        }
    }

    pub fn get(&self, id: i64) -> Option<Arc<V>> {
        self.map.read().get(&id).cloned()
    }

    /// Take this before reading from the database; pass it to [`Cache::put`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores `value` unless something was invalidated since `generation`.
    pub fn put(&self, id: i64, value: Arc<V>, generation: u64) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.write();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(id, value);
    }

    pub fn invalidate(&self, id: i64) {
        let mut map = self.map.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(&id);
    }

    /// Invalidates the id `f` finds, or everything when it finds none (an event
    /// whose payload cannot be read must not leave a stale entry behind).
    pub fn invalidate_by(&self, f: impl FnOnce() -> Option<i64>) {
        match f() {
            Some(id) => self.invalidate(id),
            None => {
                let mut map = self.map.write();
                self.generation.fetch_add(1, Ordering::AcqRel);
                map.clear();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_read_is_not_stored_after_invalidation() {
        let c = Cache::new(10);
        let g = c.generation();
        c.invalidate(1); // a writer changed entity 1 while we were reading
        c.put(1, Arc::new("old"), g);
        assert!(c.get(1).is_none());
        let g = c.generation();
        c.put(1, Arc::new("new"), g);
        assert_eq!(*c.get(1).unwrap(), "new");
    }

    #[test]
    fn full_cache_starts_over() {
        let c = Cache::new(2);
        for i in 0..3 {
            c.put(i, Arc::new(i), c.generation());
        }
        assert_eq!(c.len(), 1);
        assert!(c.get(2).is_some());
    }
}
