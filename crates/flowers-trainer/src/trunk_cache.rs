//! Trunk activations of the images seen so far, for phases whose trunk is frozen (`head`,
//! `top`). The trunk (stem to `Mixed_7a`) is ~88% of the forward pass and, frozen, gives every
//! image (and its mirror image) the same output in every epoch, so each is computed once: later
//! epochs and evaluations run only `Mixed_7b`, `Mixed_7c` and the head. The logits are the same
//! as without the cache; only the work is not repeated.

use std::collections::HashMap;

use tch::Tensor;
use tracing::info;

/// An image's identity in the cache: its file name (unique within a run) and whether it was
/// mirrored.
type Key = (String, bool);

pub struct TrunkCache {
    entries: HashMap<Key, Tensor>,
    bytes: usize,
    capacity: usize,
    full_logged: bool,
}

impl TrunkCache {
    /// A cache holding at most `capacity` bytes of activations (0 turns it off).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            bytes: 0,
            capacity,
            full_logged: false,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn get(&self, name: &str, flipped: bool) -> Option<Tensor> {
        self.entries
            .get(&(name.to_owned(), flipped))
            .map(Tensor::shallow_clone)
    }

    /// Keeps `activation` (which must own its storage, not view a batch) while there is room;
    /// once full, new images are computed every time and nothing is evicted.
    pub fn insert(&mut self, name: &str, flipped: bool, activation: Tensor) {
        let size = activation.numel() * activation.kind().elt_size_in_bytes();
        if self.bytes + size > self.capacity {
            if !self.full_logged {
                info!(
                    entries = self.entries.len(),
                    mib = self.bytes >> 20,
                    "trunk cache full: further images are not cached (raise --trunk-cache-mib)"
                );
                self.full_logged = true;
            }
            return;
        }
        if self
            .entries
            .insert((name.to_owned(), flipped), activation)
            .is_none()
        {
            self.bytes += size;
        }
    }

    /// Forgets everything: the trunk changed (it trained, or its variables were overwritten).
    pub fn clear(&mut self) {
        if !self.entries.is_empty() {
            info!(entries = self.entries.len(), "trunk changed: cache cleared");
        }
        self.entries.clear();
        self.bytes = 0;
        self.full_logged = false;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn keeps_entries_by_name_and_flip_up_to_its_capacity() {
        // Room for two 1 KiB activations.
        let mut cache = TrunkCache::new(2048);
        let act = || Tensor::ones([256], (Kind::Float, Device::Cpu));
        cache.insert("a.jpg", false, act());
        cache.insert("a.jpg", true, act() * 2);
        cache.insert("b.jpg", false, act());
        assert_eq!(cache.len(), 2);
        assert!(cache.get("b.jpg", false).is_none());
        assert_eq!(cache.get("a.jpg", true).unwrap().double_value(&[0]), 2.0);
        assert_eq!(cache.get("a.jpg", false).unwrap().double_value(&[0]), 1.0);
        cache.clear();
        assert!(cache.is_empty());
        cache.insert("b.jpg", false, act());
        assert!(cache.get("b.jpg", false).is_some());
        assert!(!TrunkCache::new(0).is_enabled());
    }
}
