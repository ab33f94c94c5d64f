//! Keys and values of every past position, per layer, in f32.

use crate::model::config::Config;

pub struct KvCache {
    kv_dim: usize,
    capacity: usize,
    len: usize,
    /// Per layer: `capacity x kv_dim` keys then values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// A cache for `capacity` positions. Memory grows as positions are written, not up front,
    /// so a large context limit costs nothing until it is used.
    pub fn new(c: &Config, capacity: usize) -> KvCache {
        KvCache {
            kv_dim: c.kv_dim(),
            capacity,
            len: 0,
            keys: vec![Vec::new(); c.n_layers],
            values: vec![Vec::new(); c.n_layers],
        }
    }

    /// Positions stored so far; the next token goes at this position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Stores the current position's key and value for layer `l`.
    pub fn write(&mut self, l: usize, k: &[f32], v: &[f32]) {
        let at = self.len * self.kv_dim;
        for (buf, src) in [(&mut self.keys[l], k), (&mut self.values[l], v)] {
            buf.truncate(at);
            buf.extend_from_slice(src);
        }
    }

    /// Keys and values of layer `l` for positions `0..n`.
    pub fn layer(&self, l: usize, n: usize) -> (&[f32], &[f32]) {
        let end = n * self.kv_dim;
        (&self.keys[l][..end], &self.values[l][..end])
    }

    /// Marks the current position as written in every layer.
    pub fn advance(&mut self) {
        self.len += 1;
    }

    /// Forgets every position (a new sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        let per: usize = self
            .keys
            .iter()
            .chain(&self.values)
            .map(|b| b.capacity())
            .sum();
        per * std::mem::size_of::<f32>()
    }
}
