//! Keys and values of every past position, per layer, in f16 (llama.cpp's default) or f32.

use half::f16;

use crate::model::config::Config;

/// The element type of the cache. f16 halves the cache and is what llama.cpp keeps by default,
/// so its attention numerics (and hence its greedy tokens) are reproduced exactly; f32 is
/// closer to a float reference such as HF transformers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum KvType {
    #[default]
    F16,
    F32,
}

impl KvType {
    pub fn bytes_per_value(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

/// Rows of one layer's keys or values, in the cache's element type.
enum Rows {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Rows {
    /// Room for `values` values, reserved exactly: the rows never reallocate (a doubling
    /// `Vec` could hold twice what a memory plan counted), and pages are only resident once
    /// written (large allocations are mapped lazily).
    fn new(dtype: KvType, values: usize) -> Rows {
        match dtype {
            KvType::F16 => Rows::F16(Vec::with_capacity(values)),
            KvType::F32 => Rows::F32(Vec::with_capacity(values)),
        }
    }

    /// Writes every reserved value once, so that all of the rows' pages are resident.
    fn touch(&mut self) {
        match self {
            Rows::F16(buf) => {
                buf.resize(buf.capacity(), f16::ZERO);
                buf.clear();
            }
            Rows::F32(buf) => {
                buf.resize(buf.capacity(), 0.0);
                buf.clear();
            }
        }
    }

    /// Overwrites position `at / kv_dim` (dropping anything after it) with `src`.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Rows::F16(buf) => {
                buf.truncate(at);
                // Round to nearest even, as ggml's f32 -> f16 copy into its cache does.
                buf.extend(src.iter().map(|&v| f16::from_f32(v)));
            }
            Rows::F32(buf) => {
                buf.truncate(at);
                buf.extend_from_slice(src);
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Rows::F16(b) => b.capacity() * 2,
            Rows::F32(b) => b.capacity() * 4,
        }
    }
}

/// One layer's keys and values for positions `0..n`, each `n x kv_dim`.
#[derive(Clone, Copy)]
pub enum KvLayer<'a> {
    F16 { keys: &'a [f16], values: &'a [f16] },
    F32 { keys: &'a [f32], values: &'a [f32] },
}

pub struct KvCache {
    kv_dim: usize,
    capacity: usize,
    len: usize,
    dtype: KvType,
    /// Whether [`KvCache::make_resident`] was called: what [`KvCache::empty_like`] repeats.
    resident: bool,
    /// Per layer: up to `capacity x kv_dim` keys, and as many values.
    keys: Vec<Rows>,
    values: Vec<Rows>,
}

impl KvCache {
    /// A cache for `capacity` positions. Its memory is reserved, but becomes resident only as
    /// positions are written, so a large context limit costs nothing until it is used (see
    /// [`KvCache::make_resident`] for the opposite).
    pub fn new(c: &Config, capacity: usize, dtype: KvType) -> KvCache {
        let values = capacity * c.kv_dim();
        KvCache {
            kv_dim: c.kv_dim(),
            capacity,
            len: 0,
            dtype,
            resident: false,
            keys: (0..c.n_layers).map(|_| Rows::new(dtype, values)).collect(),
            values: (0..c.n_layers).map(|_| Rows::new(dtype, values)).collect(),
        }
    }

    /// Makes the whole cache resident now (and forgets every position). Under a memory
    /// budget the plan counted all of it, so this takes nothing the budget did not grant;
    /// in exchange a cap too small for the plan fails at the start, not thousands of tokens
    /// in, and the process's memory stays flat while it decodes.
    pub fn make_resident(&mut self) {
        for rows in self.keys.iter_mut().chain(&mut self.values) {
            rows.touch();
        }
        self.resident = true;
        self.len = 0;
    }

    /// An empty cache of the same shape, capacity and element type, resident from the start
    /// if this one is: another sequence decoded alongside this one.
    pub fn empty_like(&self) -> KvCache {
        let values = self.capacity * self.kv_dim;
        let rows = || {
            (0..self.keys.len())
                .map(|_| Rows::new(self.dtype, values))
                .collect()
        };
        let mut kv = KvCache {
            kv_dim: self.kv_dim,
            capacity: self.capacity,
            len: 0,
            dtype: self.dtype,
            resident: false,
            keys: rows(),
            values: rows(),
        };
        if self.resident {
            kv.make_resident();
        }
        kv
    }

    /// Bytes a cache of `positions` positions holds when full.
    pub fn bytes_for(c: &Config, positions: usize, dtype: KvType) -> u64 {
        (c.n_layers * positions * c.kv_dim() * 2 * dtype.bytes_per_value()) as u64
    }

    pub fn dtype(&self) -> KvType {
        self.dtype
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
        self.write_at(l, self.len, k, v);
    }

    /// Stores position `pos`'s key and value for layer `l`, forgetting any later position of
    /// that layer (a batch writes its positions in order, then [`KvCache::advance_by`]).
    pub fn write_at(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = pos * self.kv_dim;
        self.keys[l].write(at, k);
        self.values[l].write(at, v);
    }

    /// Keys and values of layer `l` for positions `0..n`.
    pub fn layer(&self, l: usize, n: usize) -> KvLayer<'_> {
        let end = n * self.kv_dim;
        match (&self.keys[l], &self.values[l]) {
            (Rows::F16(k), Rows::F16(v)) => KvLayer::F16 {
                keys: &k[..end],
                values: &v[..end],
            },
            (Rows::F32(k), Rows::F32(v)) => KvLayer::F32 {
                keys: &k[..end],
                values: &v[..end],
            },
            _ => unreachable!("keys and values share the cache's dtype"),
        }
    }

    /// Marks the current position as written in every layer.
    pub fn advance(&mut self) {
        self.advance_by(1);
    }

    /// Marks the next `n` positions as written in every layer.
    pub fn advance_by(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets every position (a new sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets the positions from `len` on (a speculative draft the target rejected), in
    /// O(1): the rows stay allocated and the next write at a forgotten position replaces them
    /// (`Rows::write` drops everything after what it writes). Keeping more positions than
    /// are stored is a no-op, so the cache never claims rows it does not have.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(Rows::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::image::SyntheticShape::tiny().config()
    }

    #[test]
    fn the_cache_holds_exactly_its_capacity_and_never_reallocates() {
        let c = config();
        // 37 positions: a doubling Vec would round each layer up to 64.
        let mut kv = KvCache::new(&c, 37, KvType::F16);
        assert_eq!(kv.bytes() as u64, KvCache::bytes_for(&c, 37, KvType::F16));
        let row = vec![1.0f32; c.kv_dim()];
        for _ in 0..37 {
            for l in 0..c.n_layers {
                kv.write(l, &row, &row);
            }
            kv.advance();
        }
        assert!(kv.is_full());
        assert_eq!(kv.bytes() as u64, KvCache::bytes_for(&c, 37, KvType::F16));
    }

    #[test]
    fn a_resident_cache_starts_empty_and_stores_as_before() {
        let c = config();
        let mut kv = KvCache::new(&c, 8, KvType::F32);
        let k: Vec<f32> = (0..c.kv_dim()).map(|i| i as f32).collect();
        kv.write(0, &k, &k);
        kv.advance();
        kv.make_resident();
        assert!(kv.is_empty());
        assert_eq!(kv.bytes() as u64, KvCache::bytes_for(&c, 8, KvType::F32));
        kv.write(0, &k, &k);
        kv.advance();
        let KvLayer::F32 { keys, .. } = kv.layer(0, 1) else {
            panic!("an f32 cache gives f32 rows")
        };
        assert_eq!(keys, &k[..]);
    }
}
