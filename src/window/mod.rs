//! The per-layer neuron window (paper §3.1, "sliding window"), bounded by a slot capacity.
//!
//! One FFN layer has `n_neurons` neurons; neuron `i`'s weights are one *bundle* of `stride`
//! bytes. A [`Window`] keeps up to `capacity` bundles in one slab allocated once (64-byte
//! aligned, never reallocated). Each token the engine calls [`Window::plan`] with the token's
//! (predicted) active neurons; the window
//!
//! 1. marks every active neuron as used at this token;
//! 2. evicts the resident neurons that none of the last `k` tokens (this one included) used —
//!    the paper's sliding window (`k == 0`: no window, neurons stay while capacity allows);
//! 3. gives each active neuron that is not resident a free slot, evicting, if slots run short,
//!    the least recently used resident neurons that are *not* active this token (ties: lower
//!    neuron id first); active neurons that still do not fit are reported in
//!    [`Plan::overflow`], lowest ids getting slots first, and stay non-resident;
//! 4. never evicts pinned neurons ([`Window::pin`]); they count against capacity.
//!
//! Eviction is bookkeeping only (the slot returns to a free stack); the window does no I/O. The
//! caller reads every [`Plan::loads`] entry from flash into [`Window::bundle_mut`]`(slot)`
//! before computing with it.
//!
//! # Cost
//! A plan costs O(a log a) for the `a` active ids (sort + dedupe) plus O(1) per neuron
//! loaded or evicted: nothing scans all neurons or all slots. The per-neuron tables
//! (`slot_of`, `last_used`: 12 bytes a neuron) and per-slot tables are allocated in `new`.
//!
//! # Invariants (checked by `assert_invariants` in the tests)
//! - `slot_of[n] == s` ⇔ `neuron_of[s] == n`; every slot is exactly one of: free (on the free
//!   stack, `neuron_of == NONE`), pinned (`pinned[s]`), or in the LRU list.
//! - The LRU list holds the unpinned resident slots ordered by (`last_used`, neuron) ascending.
//! - `history` holds, per token of the last `k`, that token's deduplicated active list; a
//!   resident unpinned neuron `n` is in the entry of token `last_used[n]`, and
//!   `last_used[n] > token - k` after every plan (when `k > 0`).
//! - The slab is `capacity * stride` bytes and its address never changes.

mod lru;
mod slab;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use lru::SlotList;
use slab::{Slab, SlabError};

pub use slab::SLAB_ALIGN;

/// "No slot" / "no neuron" in the id maps.
const NONE: u32 = u32::MAX;

/// Shape of one layer's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Neurons in the layer (FFN intermediate size); ids are `0..n_neurons`.
    pub n_neurons: usize,
    /// Bundles the slab holds (may exceed `n_neurons`; 0 means everything overflows).
    pub capacity: usize,
    /// Bytes of one bundle.
    pub stride: usize,
    /// Tokens a neuron stays after its last use (the paper's window, 5 by default); 0 keeps
    /// neurons for as long as capacity allows (pure LRU). The window remembers the active ids
    /// of the last `k` tokens, so memory grows with `k` times the active set.
    pub k: usize,
}

impl WindowConfig {
    /// The paper's window length.
    pub const DEFAULT_K: usize = 5;
}

/// What one token needs done: the caller fills `loads` from flash and computes `overflow`
/// from a scratch buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Active neurons already resident (pinned ones included).
    pub hits: usize,
    /// `(neuron, slot)` for every active neuron that got a slot and must be read into
    /// `bundle_mut(slot)`; sorted by neuron.
    pub loads: Vec<(u32, u32)>,
    /// Active neurons that did not fit (more active neurons than free + evictable slots);
    /// sorted, not resident.
    pub overflow: Vec<u32>,
    /// Neurons evicted by this plan (window and capacity together).
    pub evicted: usize,
}

impl Plan {
    /// Distinct active neurons of the token.
    pub fn needed(&self) -> usize {
        self.hits + self.loads.len() + self.overflow.len()
    }

    fn reset(&mut self) {
        self.hits = 0;
        self.loads.clear();
        self.overflow.clear();
        self.evicted = 0;
    }
}

/// Cumulative counters since creation or the last [`Window::reset_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Plans made.
    pub tokens: u64,
    /// Sum over tokens of the distinct active neurons.
    pub needed: u64,
    /// Active neurons found resident.
    pub hits: u64,
    /// Bundles the caller had to load (plans and pins).
    pub loads: u64,
    /// Neurons evicted (window, capacity pressure, and pins making room).
    pub evictions: u64,
    /// Active neurons that did not fit.
    pub overflow: u64,
}

impl WindowStats {
    /// `hits / needed` (1 when nothing was needed).
    pub fn hit_rate(&self) -> f64 {
        if self.needed == 0 {
            1.0
        } else {
            self.hits as f64 / self.needed as f64
        }
    }
}

/// Errors of the window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("a layer of {n_neurons} neurons does not fit the window's u32 neuron ids (at most {max}); this model's FFN is too wide for the window")]
    TooManyNeurons { n_neurons: usize, max: usize },
    #[error("a window of {capacity} slots exceeds the u32 slot ids (at most {max}); lower the memory budget")]
    TooManySlots { capacity: usize, max: usize },
    #[error("a window slab of {capacity} bundles x {stride} bytes overflows the address space; lower the memory budget")]
    SlabTooLarge { capacity: usize, stride: usize },
    #[error("could not allocate the window slab of {bytes} bytes; lower the memory budget")]
    AllocFailed { bytes: usize },
    #[error("neuron id {neuron} is out of range: the layer has {n_neurons} neurons (ids 0..{n_neurons}); the predictor or pin list does not match this model")]
    NeuronOutOfRange { neuron: u32, n_neurons: usize },
    #[error("cannot pin {requested} neurons in a window of {capacity} slots; pin fewer hot neurons or raise the memory budget")]
    TooManyPins { requested: usize, capacity: usize },
    #[error("neuron {neuron} is not resident in the window: only hits, loads of the last plan and pinned neurons have slots; compute it from the overflow buffer instead")]
    NotResident { neuron: u32 },
}

/// One layer's neuron window. See the module documentation for the rules.
pub struct Window {
    cfg: WindowConfig,
    slab: Slab,
    /// neuron -> slot or `NONE`.
    slot_of: Vec<u32>,
    /// neuron -> last token it was active at (0: never; tokens count from 1).
    last_used: Vec<u64>,
    /// slot -> neuron or `NONE`.
    neuron_of: Vec<u32>,
    /// slot -> pinned.
    pinned: Vec<bool>,
    n_pinned: usize,
    /// Unpinned resident slots, least recently used first.
    lru: SlotList,
    /// Free slots; popped from the end (slot 0 first after `new`).
    free: Vec<u32>,
    /// `(token, deduplicated active ids)` for the last `k` tokens, oldest first.
    history: VecDeque<(u64, Vec<u32>)>,
    /// Recycled `history` buffers.
    spare: Vec<Vec<u32>>,
    /// Deduplicated active ids of the current plan.
    scratch: Vec<u32>,
    /// Current token (number of plans made; the first plan is token 1).
    token: u64,
    stats: WindowStats,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("cfg", &self.cfg)
            .field("resident", &self.resident())
            .field("pinned", &self.n_pinned)
            .field("token", &self.token)
            .field("slab", &self.slab)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Window {
    /// Allocates the slab (zeroed, lazily committed by the OS) and the id maps.
    pub fn new(cfg: WindowConfig) -> Result<Window, WindowError> {
        let max = NONE as usize;
        if cfg.n_neurons > max {
            return Err(WindowError::TooManyNeurons {
                n_neurons: cfg.n_neurons,
                max,
            });
        }
        if cfg.capacity > max {
            return Err(WindowError::TooManySlots {
                capacity: cfg.capacity,
                max,
            });
        }
        let too_large = WindowError::SlabTooLarge {
            capacity: cfg.capacity,
            stride: cfg.stride,
        };
        let bytes = cfg
            .capacity
            .checked_mul(cfg.stride)
            .ok_or(too_large.clone())?;
        let slab = Slab::zeroed(bytes).map_err(|e| match e {
            SlabError::TooLarge => too_large,
            SlabError::AllocFailed => WindowError::AllocFailed { bytes },
        })?;
        Ok(Window {
            cfg,
            slab,
            slot_of: vec![NONE; cfg.n_neurons],
            last_used: vec![0; cfg.n_neurons],
            neuron_of: vec![NONE; cfg.capacity],
            pinned: vec![false; cfg.capacity],
            n_pinned: 0,
            lru: SlotList::new(cfg.capacity),
            free: (0..cfg.capacity as u32).rev().collect(),
            history: VecDeque::new(),
            spare: Vec::new(),
            scratch: Vec::new(),
            token: 0,
            stats: WindowStats::default(),
        })
    }

    /// Plans one token: see the module documentation. `active` may be unsorted and hold
    /// duplicates. An id `>= n_neurons` is an error and leaves the window unchanged.
    pub fn plan(&mut self, active: &[u32]) -> Result<Plan, WindowError> {
        let mut plan = Plan::default();
        self.plan_into(active, &mut plan)?;
        Ok(plan)
    }

    /// [`Window::plan`] into a reused `Plan` (no allocation once its vectors have grown).
    pub fn plan_into(&mut self, active: &[u32], plan: &mut Plan) -> Result<(), WindowError> {
        plan.reset();
        self.check_ids(active)?;
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend_from_slice(active);
        ids.sort_unstable();
        ids.dedup();

        self.token += 1;
        let t = self.token;
        for &n in &ids {
            self.last_used[n as usize] = t;
        }

        // Rule 2: the sliding window. A resident unpinned neuron sits in the history entry of
        // its last use, so dropping the entry of the token that leaves the window finds it.
        if self.cfg.k > 0 {
            let k = self.cfg.k as u64;
            while let Some(&(u, _)) = self.history.front() {
                if u + k > t {
                    break;
                }
                let (u, mut old) = self.history.pop_front().expect("front checked");
                for &n in &old {
                    let s = self.slot_of[n as usize];
                    if self.last_used[n as usize] == u && s != NONE && !self.pinned[s as usize] {
                        self.evict(s);
                        plan.evicted += 1;
                    }
                }
                old.clear();
                self.spare.push(old);
            }
            let mut entry = self.spare.pop().unwrap_or_default();
            entry.extend_from_slice(&ids);
            self.history.push_back((t, entry));
        }

        // Rule 3: capacity pressure. Walk from the LRU head, skipping this token's active
        // neurons (at most |active| skips), evicting until the missing ones fit.
        let missing = ids
            .iter()
            .filter(|&&n| self.slot_of[n as usize] == NONE)
            .count();
        let mut short = missing.saturating_sub(self.free.len());
        let mut cur = self.lru.head();
        while short > 0 && cur != lru::NIL {
            let next = self.lru.next(cur);
            if self.last_used[self.neuron_of[cur as usize] as usize] != t {
                self.evict(cur);
                plan.evicted += 1;
                short -= 1;
            }
            cur = next;
        }

        // Hits move to the back, misses take free slots, in ascending id order so that the
        // LRU list stays ordered by (last_used, neuron).
        for &n in &ids {
            let s = self.slot_of[n as usize];
            if s != NONE {
                plan.hits += 1;
                if !self.pinned[s as usize] {
                    self.lru.move_to_back(s);
                }
            } else if let Some(s) = self.free.pop() {
                self.slot_of[n as usize] = s;
                self.neuron_of[s as usize] = n;
                self.lru.push_back(s);
                plan.loads.push((n, s));
            } else {
                plan.overflow.push(n);
            }
        }

        let st = &mut self.stats;
        st.tokens += 1;
        st.needed += ids.len() as u64;
        st.hits += plan.hits as u64;
        st.loads += plan.loads.len() as u64;
        st.evictions += plan.evicted as u64;
        st.overflow += plan.overflow.len() as u64;
        self.scratch = ids;
        Ok(())
    }

    /// Pins neurons (e.g. the most frequently active ones from calibration): they get a slot
    /// now and are never evicted, not even by [`Window::clear`]. Pins accumulate over calls.
    /// Returns `(neuron, slot)` for the pinned neurons that were not resident, sorted by
    /// neuron: the caller fills those bundles. Unpinned neurons are evicted, least recently
    /// used first, if free slots run short. Errors (leaving the window unchanged) if an id is
    /// out of range or the pins would exceed the capacity.
    pub fn pin(&mut self, neurons: &[u32]) -> Result<Vec<(u32, u32)>, WindowError> {
        self.check_ids(neurons)?;
        let mut ids = neurons.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|&n| {
            let s = self.slot_of[n as usize];
            s == NONE || !self.pinned[s as usize]
        });
        let requested = self.n_pinned + ids.len();
        if requested > self.cfg.capacity {
            return Err(WindowError::TooManyPins {
                requested,
                capacity: self.cfg.capacity,
            });
        }
        // Resident ones first, so that making room below cannot evict a neuron being pinned.
        for &n in &ids {
            let s = self.slot_of[n as usize];
            if s != NONE {
                self.lru.unlink(s);
                self.pinned[s as usize] = true;
                self.n_pinned += 1;
            }
        }
        let mut fills = Vec::new();
        for &n in &ids {
            if self.slot_of[n as usize] != NONE {
                continue;
            }
            let s = match self.free.pop() {
                Some(s) => s,
                None => {
                    // Slots = free + pinned + LRU, and pinned < capacity here, so LRU is
                    // non-empty.
                    let s = self.lru.head();
                    debug_assert_ne!(s, lru::NIL);
                    self.evict(s);
                    self.stats.evictions += 1;
                    self.free.pop().expect("evict freed a slot")
                }
            };
            self.slot_of[n as usize] = s;
            self.neuron_of[s as usize] = n;
            self.pinned[s as usize] = true;
            self.n_pinned += 1;
            fills.push((n, s));
        }
        self.stats.loads += fills.len() as u64;
        Ok(fills)
    }

    /// Forgets every unpinned neuron and the window history (a new sequence). Pins, the slab
    /// contents of pinned slots and the statistics stay. O(resident).
    pub fn clear(&mut self) {
        while self.lru.head() != lru::NIL {
            let s = self.lru.head();
            self.evict(s);
        }
        while let Some((_, mut old)) = self.history.pop_front() {
            old.clear();
            self.spare.push(old);
        }
    }

    /// The slot of `neuron`, if resident (`None` also for an out-of-range id).
    pub fn slot(&self, neuron: u32) -> Option<u32> {
        match self.slot_of.get(neuron as usize) {
            Some(&s) if s != NONE => Some(s),
            _ => None,
        }
    }

    /// Slots of `neurons` (all resident) into `out` (cleared first), for the sparse FFN
    /// kernel. Errors on the first out-of-range or non-resident id.
    pub fn slots_of(&self, neurons: &[u32], out: &mut Vec<u32>) -> Result<(), WindowError> {
        out.clear();
        out.reserve(neurons.len());
        for &n in neurons {
            let s = *self
                .slot_of
                .get(n as usize)
                .ok_or(WindowError::NeuronOutOfRange {
                    neuron: n,
                    n_neurons: self.cfg.n_neurons,
                })?;
            if s == NONE {
                return Err(WindowError::NotResident { neuron: n });
            }
            out.push(s);
        }
        Ok(())
    }

    /// The bundle bytes of `slot`. Panics if `slot >= capacity`.
    pub fn bundle(&self, slot: u32) -> &[u8] {
        let start = slot as usize * self.cfg.stride;
        &self.slab.as_slice()[start..start + self.cfg.stride]
    }

    /// The bundle bytes of `slot`, to fill after a load. Panics if `slot >= capacity`.
    pub fn bundle_mut(&mut self, slot: u32) -> &mut [u8] {
        let start = slot as usize * self.cfg.stride;
        let stride = self.cfg.stride;
        &mut self.slab.as_mut_slice()[start..start + stride]
    }

    /// The whole slab (`capacity * stride` bytes, slot `s` at `s * stride`; 64-byte aligned,
    /// never moves), e.g. to upload or to fill many slots in parallel.
    pub fn slab(&self) -> &[u8] {
        self.slab.as_slice()
    }

    /// The whole slab, mutable.
    pub fn slab_mut(&mut self) -> &mut [u8] {
        self.slab.as_mut_slice()
    }

    /// Neurons holding a slot (pinned included).
    pub fn resident(&self) -> usize {
        self.lru.len() + self.n_pinned
    }

    /// Pinned neurons.
    pub fn pinned(&self) -> usize {
        self.n_pinned
    }

    /// The pinned neurons in id order: what stays resident whatever the plans do, so a
    /// computation over them alone (a self draft) needs no reads and moves nothing.
    pub fn pinned_neurons(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .neuron_of
            .iter()
            .zip(&self.pinned)
            .filter(|&(&n, &p)| p && n != NONE)
            .map(|(&n, _)| n)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Whether `neuron` is pinned.
    pub fn is_pinned(&self, neuron: u32) -> bool {
        self.slot(neuron).is_some_and(|s| self.pinned[s as usize])
    }

    /// Slots in the slab.
    pub fn capacity(&self) -> usize {
        self.cfg.capacity
    }

    /// Slab bytes (`capacity * stride`).
    pub fn bytes(&self) -> usize {
        self.slab.len()
    }

    /// Bytes of one bundle.
    pub fn stride(&self) -> usize {
        self.cfg.stride
    }

    /// The configuration the window was built with.
    pub fn config(&self) -> &WindowConfig {
        &self.cfg
    }

    /// Plans made so far (the current token number).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Cumulative statistics.
    pub fn stats(&self) -> &WindowStats {
        &self.stats
    }

    /// Zeroes the statistics.
    pub fn reset_stats(&mut self) {
        self.stats = WindowStats::default();
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), WindowError> {
        match ids.iter().find(|&&n| n as usize >= self.cfg.n_neurons) {
            Some(&neuron) => Err(WindowError::NeuronOutOfRange {
                neuron,
                n_neurons: self.cfg.n_neurons,
            }),
            None => Ok(()),
        }
    }

    /// Evicts the unpinned resident neuron in slot `s` (bookkeeping only).
    fn evict(&mut self, s: u32) {
        debug_assert!(!self.pinned[s as usize]);
        let n = self.neuron_of[s as usize];
        self.slot_of[n as usize] = NONE;
        self.neuron_of[s as usize] = NONE;
        self.lru.unlink(s);
        self.free.push(s);
    }
}
