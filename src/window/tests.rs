use std::time::Instant;

use super::*;
use crate::rng::Rng;

fn cfg(n_neurons: usize, capacity: usize, k: usize) -> WindowConfig {
    WindowConfig {
        n_neurons,
        capacity,
        stride: 8,
        k,
    }
}

fn window(n_neurons: usize, capacity: usize, k: usize) -> Window {
    Window::new(cfg(n_neurons, capacity, k)).unwrap()
}

fn resident_set(w: &Window) -> Vec<u32> {
    (0..w.cfg.n_neurons as u32)
        .filter(|&n| w.slot(n).is_some())
        .collect()
}

fn load_ids(p: &Plan) -> Vec<u32> {
    p.loads.iter().map(|&(n, _)| n).collect()
}

impl Window {
    /// Checks every invariant of the module documentation (O(n_neurons + capacity)).
    fn assert_invariants(&self) {
        let cap = self.cfg.capacity;
        assert_eq!(self.slab.len(), cap * self.cfg.stride);
        let mut seen = vec![false; cap];
        for (n, &s) in self.slot_of.iter().enumerate() {
            if s != NONE {
                assert!((s as usize) < cap);
                assert!(!seen[s as usize], "slot {s} held twice");
                seen[s as usize] = true;
                assert_eq!(self.neuron_of[s as usize], n as u32);
            }
        }
        for (s, &n) in self.neuron_of.iter().enumerate() {
            if n != NONE {
                assert_eq!(self.slot_of[n as usize], s as u32);
            }
        }
        let mut free_seen = vec![false; cap];
        for &s in &self.free {
            assert!(!free_seen[s as usize], "slot {s} free twice");
            free_seen[s as usize] = true;
            assert_eq!(self.neuron_of[s as usize], NONE);
            assert!(!self.pinned[s as usize]);
            assert!(!self.lru.contains(s));
        }
        let n_pinned = self.pinned.iter().filter(|&&p| p).count();
        assert_eq!(n_pinned, self.n_pinned);
        for s in 0..cap as u32 {
            let kinds = [
                free_seen[s as usize],
                self.pinned[s as usize],
                self.lru.contains(s),
            ];
            assert_eq!(
                kinds.iter().filter(|&&b| b).count(),
                1,
                "slot {s}: {kinds:?}"
            );
            if self.pinned[s as usize] {
                assert_ne!(self.neuron_of[s as usize], NONE);
            }
        }
        assert_eq!(self.lru.len() + self.n_pinned + self.free.len(), cap);
        let order: Vec<(u64, u32)> = self
            .lru
            .iter()
            .map(|s| {
                let n = self.neuron_of[s as usize];
                (self.last_used[n as usize], n)
            })
            .collect();
        assert_eq!(order.len(), self.lru.len());
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "LRU not ordered: {order:?}"
        );
        if self.cfg.k > 0 {
            assert!(self.history.len() <= self.cfg.k);
            for &(u, n) in &order {
                assert!(
                    u + self.cfg.k as u64 > self.token,
                    "neuron {n} outlived the window"
                );
                let entry = self.history.iter().find(|(t, _)| *t == u);
                let (_, ids) = entry.unwrap_or_else(|| panic!("no history for token {u}"));
                assert!(ids.binary_search(&n).is_ok());
            }
        } else {
            assert!(self.history.is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests, one rule at a time.

#[test]
fn config_errors() {
    let e = Window::new(WindowConfig {
        n_neurons: 10,
        capacity: 1 << 20,
        stride: usize::MAX / 4,
        k: 5,
    })
    .unwrap_err();
    assert!(matches!(e, WindowError::SlabTooLarge { .. }), "{e}");
    let e = Window::new(WindowConfig {
        n_neurons: 10,
        capacity: 1 << 31,
        stride: 1 << 32,
        k: 5,
    })
    .unwrap_err();
    assert!(matches!(e, WindowError::SlabTooLarge { .. }), "{e}");
    let e = Window::new(WindowConfig {
        n_neurons: 10,
        capacity: u32::MAX as usize + 1,
        stride: 0,
        k: 5,
    })
    .unwrap_err();
    assert!(matches!(e, WindowError::TooManySlots { .. }), "{e}");
    // The message says what to do.
    assert!(e.to_string().contains("memory budget"));
}

#[test]
fn slab_is_aligned_and_sized() {
    let w = Window::new(WindowConfig {
        n_neurons: 100,
        capacity: 10,
        stride: 24,
        k: 5,
    })
    .unwrap();
    assert_eq!(w.bytes(), 240);
    assert_eq!(w.slab().len(), 240);
    assert_eq!(w.slab().as_ptr() as usize % SLAB_ALIGN, 0);
    assert!(w.slab().iter().all(|&b| b == 0));
    assert_eq!(w.bundle(9).len(), 24);
    let empty = window(10, 0, 5);
    assert_eq!(empty.bytes(), 0);
    assert_eq!(empty.slab().as_ptr() as usize % SLAB_ALIGN, 0);
}

#[test]
fn first_plan_loads_everything_sorted() {
    let mut w = window(100, 10, 5);
    let p = w.plan(&[42, 7, 99, 0]).unwrap();
    assert_eq!(p.hits, 0);
    assert_eq!(load_ids(&p), vec![0, 7, 42, 99]);
    assert!(p.overflow.is_empty());
    assert_eq!(p.evicted, 0);
    assert_eq!(p.needed(), 4);
    for &(n, s) in &p.loads {
        assert_eq!(w.slot(n), Some(s));
    }
    let p = w.plan(&[7, 42, 3]).unwrap();
    assert_eq!(p.hits, 2);
    assert_eq!(load_ids(&p), vec![3]);
    assert_eq!(w.resident(), 5);
    w.assert_invariants();
}

#[test]
fn window_evicts_neurons_unused_for_k_tokens() {
    let mut w = window(10, 10, 2);
    w.plan(&[1, 2]).unwrap(); // t1
    w.plan(&[2, 3]).unwrap(); // t2
    let p = w.plan(&[3]).unwrap(); // t3: window {t2, t3}: 1 goes
    assert_eq!(p.evicted, 1);
    assert_eq!(resident_set(&w), vec![2, 3]);
    let p = w.plan(&[]).unwrap(); // t4: window {t3, t4}: 2 goes
    assert_eq!(p.evicted, 1);
    assert_eq!(resident_set(&w), vec![3]);
    let p = w.plan(&[]).unwrap(); // t5: 3 goes
    assert_eq!(p.evicted, 1);
    assert_eq!(w.resident(), 0);
    w.assert_invariants();
    assert_eq!(w.stats().evictions, 3);
}

#[test]
fn window_of_one_keeps_only_this_token() {
    let mut w = window(10, 10, 1);
    w.plan(&[1, 2, 3]).unwrap();
    let p = w.plan(&[3, 4]).unwrap();
    assert_eq!(p.evicted, 2);
    assert_eq!(p.hits, 1);
    assert_eq!(resident_set(&w), vec![3, 4]);
    w.assert_invariants();
}

#[test]
fn reuse_within_window_keeps_neuron() {
    let mut w = window(10, 10, 5);
    w.plan(&[1]).unwrap();
    for _ in 0..3 {
        w.plan(&[2]).unwrap();
    }
    w.plan(&[1]).unwrap(); // t5: 1 used at t1, still inside {t1..t5}
    for _ in 0..4 {
        w.plan(&[]).unwrap();
    }
    assert!(w.slot(1).is_some(), "used at t5, window t5..t9");
    w.plan(&[]).unwrap();
    assert!(w.slot(1).is_none());
    assert_eq!(w.stats().loads, 2);
    w.assert_invariants();
}

#[test]
fn k_zero_is_pure_lru() {
    let mut w = window(10, 3, 0);
    for n in [1, 2, 3] {
        w.plan(&[n]).unwrap();
    }
    for _ in 0..100 {
        w.plan(&[]).unwrap();
    }
    assert_eq!(resident_set(&w), vec![1, 2, 3]);
    let p = w.plan(&[4]).unwrap();
    assert_eq!(p.evicted, 1);
    assert_eq!(resident_set(&w), vec![2, 3, 4]);
    // 2 is used, so 3 is now least recently used.
    let p = w.plan(&[2, 5]).unwrap();
    assert_eq!((p.hits, p.evicted), (1, 1));
    assert_eq!(resident_set(&w), vec![2, 4, 5]);
    w.assert_invariants();
}

#[test]
fn capacity_pressure_never_evicts_active_neurons() {
    let mut w = window(10, 2, 5);
    w.plan(&[1, 2]).unwrap();
    // 1 is the (tied) least recently used, but it is active: 2 goes.
    let p = w.plan(&[1, 3]).unwrap();
    assert_eq!((p.hits, p.evicted), (1, 1));
    assert_eq!(resident_set(&w), vec![1, 3]);
    w.assert_invariants();
}

#[test]
fn lru_ties_break_by_lower_id() {
    let mut w = window(10, 3, 0);
    w.plan(&[5, 1, 3]).unwrap();
    w.plan(&[7]).unwrap();
    assert_eq!(resident_set(&w), vec![3, 5, 7]);
    w.plan(&[8]).unwrap();
    assert_eq!(resident_set(&w), vec![5, 7, 8]);
}

#[test]
fn overflow_when_active_exceeds_capacity() {
    let mut w = window(10, 2, 5);
    let p = w.plan(&[5, 1, 3]).unwrap();
    assert_eq!(load_ids(&p), vec![1, 3]);
    assert_eq!(p.overflow, vec![5]);
    assert!(w.slot(5).is_none());
    // 3 is not active: it makes room for 7; 1 stays.
    let p = w.plan(&[1, 7]).unwrap();
    assert_eq!((p.hits, p.evicted), (1, 1));
    assert_eq!(load_ids(&p), vec![7]);
    assert!(p.overflow.is_empty());
    assert_eq!(w.stats().overflow, 1);
    // Everything active and resident plus more: the active residents stay, extras overflow.
    let p = w.plan(&[1, 7, 0, 9]).unwrap();
    assert_eq!((p.hits, p.evicted), (2, 0));
    assert_eq!(p.overflow, vec![0, 9]);
    w.assert_invariants();
}

#[test]
fn capacity_zero_overflows_everything() {
    let mut w = window(10, 0, 5);
    let p = w.plan(&[3, 1, 3]).unwrap();
    assert_eq!(p.overflow, vec![1, 3]);
    assert!(p.loads.is_empty());
    assert_eq!(w.resident(), 0);
    assert!(w.pin(&[1]).is_err());
    assert!(w.pin(&[]).unwrap().is_empty());
    w.assert_invariants();
}

#[test]
fn duplicates_are_deduplicated() {
    let mut w = window(10, 10, 5);
    let p = w.plan(&[3, 3, 1, 3, 1]).unwrap();
    assert_eq!(load_ids(&p), vec![1, 3]);
    assert_eq!(w.stats().needed, 2);
    let p = w.plan(&[1, 1]).unwrap();
    assert_eq!(p.hits, 1);
    assert_eq!(w.stats().needed, 3);
    w.assert_invariants();
}

#[test]
fn out_of_range_ids_are_errors_and_change_nothing() {
    let mut w = window(10, 10, 1);
    w.plan(&[1]).unwrap();
    let e = w.plan(&[2, 10]).unwrap_err();
    assert_eq!(
        e,
        WindowError::NeuronOutOfRange {
            neuron: 10,
            n_neurons: 10
        }
    );
    assert!(e.to_string().contains("0..10"));
    assert_eq!(w.token(), 1);
    assert_eq!(
        resident_set(&w),
        vec![1],
        "k = 1 window must not have advanced"
    );
    assert_eq!(w.stats().tokens, 1);
    assert!(w.pin(&[u32::MAX]).is_err());
    assert_eq!(w.slot(u32::MAX), None);
    let mut out = vec![99];
    assert!(w.slots_of(&[1, 11], &mut out).is_err());
    w.assert_invariants();
}

#[test]
fn slots_of_fills_in_order() {
    let mut w = window(10, 10, 5);
    let p = w.plan(&[4, 2, 8]).unwrap();
    let mut out = vec![123];
    w.slots_of(&[8, 2, 4], &mut out).unwrap();
    let slot = |n| p.loads.iter().find(|l| l.0 == n).unwrap().1;
    assert_eq!(out, vec![slot(8), slot(2), slot(4)]);
    assert_eq!(
        w.slots_of(&[8, 3], &mut out),
        Err(WindowError::NotResident { neuron: 3 })
    );
}

#[test]
fn pins_are_never_evicted() {
    let mut w = window(10, 3, 1);
    let fills = w.pin(&[7, 7]).unwrap();
    assert_eq!(fills.len(), 1);
    assert_eq!(fills[0].0, 7);
    assert!(w.is_pinned(7));
    assert_eq!(w.resident(), 1);
    w.plan(&[1, 2]).unwrap();
    let p = w.plan(&[3, 4, 5]).unwrap(); // 1, 2 leave by the window; only 2 free slots
    assert_eq!(p.evicted, 2);
    assert_eq!(load_ids(&p), vec![3, 4]);
    assert_eq!(p.overflow, vec![5]);
    for _ in 0..10 {
        w.plan(&[]).unwrap();
    }
    assert_eq!(resident_set(&w), vec![7]);
    // A pinned active neuron is a hit.
    let p = w.plan(&[7]).unwrap();
    assert_eq!((p.hits, p.loads.len()), (1, 0));
    w.assert_invariants();
}

#[test]
fn pinning_a_resident_neuron_keeps_its_slot() {
    let mut w = window(10, 3, 0);
    let p = w.plan(&[1, 2, 3]).unwrap();
    let s2 = p.loads[1].1;
    assert!(w.pin(&[2]).unwrap().is_empty());
    assert_eq!(w.slot(2), Some(s2));
    // Pinning 9 needs a slot: 1 (least recently used, unpinned) goes.
    let fills = w.pin(&[9]).unwrap();
    assert_eq!(fills.len(), 1);
    assert_eq!(resident_set(&w), vec![2, 3, 9]);
    assert_eq!(w.pinned(), 2);
    w.plan(&[4, 5]).unwrap();
    assert_eq!(resident_set(&w), vec![2, 4, 9]);
    w.assert_invariants();
}

#[test]
fn pinning_never_evicts_a_neuron_being_pinned() {
    let mut w = window(10, 2, 0);
    w.plan(&[2]).unwrap();
    w.plan(&[5]).unwrap();
    // 1 needs a slot; 2 is the LRU head but is pinned in the same call.
    let fills = w.pin(&[1, 2]).unwrap();
    assert_eq!(fills.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1]);
    assert_eq!(resident_set(&w), vec![1, 2]);
    w.assert_invariants();
}

#[test]
fn too_many_pins_is_an_error_and_changes_nothing() {
    let mut w = window(10, 3, 5);
    w.pin(&[0, 1]).unwrap();
    w.plan(&[5]).unwrap();
    let e = w.pin(&[1, 2, 3]).unwrap_err();
    assert_eq!(
        e,
        WindowError::TooManyPins {
            requested: 4,
            capacity: 3
        }
    );
    assert_eq!(w.pinned(), 2);
    assert_eq!(resident_set(&w), vec![0, 1, 5]);
    // Re-pinning is free; filling the capacity with pins overflows everything else.
    w.pin(&[0, 1, 2]).unwrap();
    let p = w.plan(&[4, 2]).unwrap();
    assert_eq!((p.hits, p.overflow.clone()), (1, vec![4]));
    w.assert_invariants();
}

#[test]
fn clear_forgets_all_but_pins() {
    let mut w = window(10, 5, 2);
    let fills = w.pin(&[9]).unwrap();
    w.bundle_mut(fills[0].1).copy_from_slice(b"pinned!!");
    w.plan(&[1, 2]).unwrap();
    w.plan(&[3]).unwrap();
    w.clear();
    assert_eq!(resident_set(&w), vec![9]);
    assert_eq!(w.bundle(w.slot(9).unwrap()), b"pinned!!");
    w.assert_invariants();
    let p = w.plan(&[1, 3]).unwrap();
    assert_eq!((p.hits, p.evicted, p.loads.len()), (0, 0, 2));
    assert_eq!(w.stats().tokens, 3);
    w.reset_stats();
    assert_eq!(*w.stats(), WindowStats::default());
    w.plan(&[]).unwrap();
    w.plan(&[]).unwrap();
    assert_eq!(resident_set(&w), vec![9]);
    w.assert_invariants();
}

#[test]
fn stats_add_up() {
    let mut w = window(20, 4, 2);
    w.plan(&[1, 2, 3]).unwrap();
    w.plan(&[2, 3, 4, 5, 6]).unwrap();
    let s = *w.stats();
    assert_eq!(s.tokens, 2);
    assert_eq!(s.needed, 8);
    assert_eq!(s.hits + s.loads + s.overflow, s.needed);
    assert_eq!((s.hits, s.loads, s.overflow), (2, 5, 1));
    assert_eq!(s.evictions, 1);
    assert!((s.hit_rate() - 0.25).abs() < 1e-12);
}

#[test]
fn plan_into_reuses_buffers() {
    let mut w = window(100, 10, 5);
    let mut p = Plan::default();
    w.plan_into(&[1, 2, 3], &mut p).unwrap();
    assert_eq!(p.loads.len(), 3);
    w.plan_into(&[1, 4], &mut p).unwrap();
    assert_eq!((p.hits, load_ids(&p)), (1, vec![4]));
}

// ---------------------------------------------------------------------------------------------
// Property test against a naive reference model.

/// The rules applied naively, in O(n_neurons) per token.
#[derive(Clone)]
struct Reference {
    cap: usize,
    k: u64,
    resident: Vec<bool>,
    pinned: Vec<bool>,
    last_used: Vec<u64>,
    t: u64,
}

#[derive(Debug, PartialEq, Eq)]
struct RefPlan {
    hits: usize,
    loads: Vec<u32>,
    overflow: Vec<u32>,
    evicted: usize,
}

impl Reference {
    fn new(n: usize, cap: usize, k: usize) -> Reference {
        Reference {
            cap,
            k: k as u64,
            resident: vec![false; n],
            pinned: vec![false; n],
            last_used: vec![0; n],
            t: 0,
        }
    }

    fn n_resident(&self) -> usize {
        self.resident.iter().filter(|&&r| r).count()
    }

    /// Evicts the unpinned resident neuron with the smallest (last_used, id) that `keep`
    /// does not protect.
    fn evict_lru(&mut self, keep: impl Fn(usize) -> bool) -> bool {
        let victim = (0..self.resident.len())
            .filter(|&n| self.resident[n] && !self.pinned[n] && !keep(n))
            .min_by_key(|&n| (self.last_used[n], n));
        match victim {
            Some(n) => {
                self.resident[n] = false;
                true
            }
            None => false,
        }
    }

    fn plan(&mut self, active: &[u32]) -> Option<RefPlan> {
        if active.iter().any(|&n| n as usize >= self.resident.len()) {
            return None;
        }
        let mut ids = active.to_vec();
        ids.sort_unstable();
        ids.dedup();
        self.t += 1;
        let t = self.t;
        for &n in &ids {
            self.last_used[n as usize] = t;
        }
        let mut evicted = 0;
        if self.k > 0 {
            for n in 0..self.resident.len() {
                if self.resident[n] && !self.pinned[n] && self.last_used[n] + self.k <= t {
                    self.resident[n] = false;
                    evicted += 1;
                }
            }
        }
        let missing: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&n| !self.resident[n as usize])
            .collect();
        while missing.len() > self.cap - self.n_resident() {
            let last_used = self.last_used.clone();
            if !self.evict_lru(|n| last_used[n] == t) {
                break;
            }
            evicted += 1;
        }
        let free = self.cap - self.n_resident();
        let fit = missing.len().min(free);
        for &n in &missing[..fit] {
            self.resident[n as usize] = true;
        }
        Some(RefPlan {
            hits: ids.len() - missing.len(),
            loads: missing[..fit].to_vec(),
            overflow: missing[fit..].to_vec(),
            evicted,
        })
    }

    fn pin(&mut self, neurons: &[u32]) -> Option<Vec<u32>> {
        if neurons.iter().any(|&n| n as usize >= self.resident.len()) {
            return None;
        }
        let mut ids = neurons.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|&n| !self.pinned[n as usize]);
        let pinned = self.pinned.iter().filter(|&&p| p).count();
        if pinned + ids.len() > self.cap {
            return None;
        }
        for &n in &ids {
            if self.resident[n as usize] {
                self.pinned[n as usize] = true;
            }
        }
        let mut fills = Vec::new();
        for &n in &ids {
            if !self.resident[n as usize] {
                if self.n_resident() == self.cap {
                    assert!(self.evict_lru(|_| false));
                }
                self.resident[n as usize] = true;
                self.pinned[n as usize] = true;
                fills.push(n);
            }
        }
        Some(fills)
    }

    fn clear(&mut self) {
        self.resident.clone_from(&self.pinned);
    }
}

fn tag(n: u32) -> [u8; 8] {
    (u64::from(n) * 0x0101_0101 + 17).to_le_bytes()
}

fn fill(w: &mut Window, loads: &[(u32, u32)]) {
    for &(n, s) in loads {
        w.bundle_mut(s).copy_from_slice(&tag(n));
    }
}

fn random_active(rng: &mut Rng, n: usize, cap: usize, hot: &[u32], prev: &[u32]) -> Vec<u32> {
    let max_len = (2 * cap + 3).min(3 * n);
    let len = rng.below(max_len + 1);
    match rng.below(8) {
        0 => Vec::new(),
        1 | 2 => {
            let mut a = prev.to_vec();
            for _ in 0..rng.below(3) {
                if !prev.is_empty() {
                    a.push(prev[rng.below(prev.len())]);
                }
            }
            a.reverse();
            a
        }
        3..=5 => (0..len)
            .map(|_| {
                if rng.below(100) < 85 {
                    hot[rng.below(hot.len())]
                } else {
                    rng.below(n) as u32
                }
            })
            .collect(),
        _ => (0..len).map(|_| rng.below(n) as u32).collect(),
    }
}

#[test]
fn matches_reference_model() {
    let mut checked = 0usize;
    for seed in 0..1000u64 {
        let mut rng = Rng::new(seed * 7919 + 1);
        let n = [1, 6, 25, 90][rng.below(4)];
        let cap = match rng.below(6) {
            0 => 0,
            1 => 1.min(n),
            2 => n / 4 + 1,
            3 => n / 2,
            4 => n,
            _ => n + 7,
        };
        let k = [0, 1, 2, 5][rng.below(4)];
        let mut w = window(n, cap, k);
        let mut r = Reference::new(n, cap, k);
        let slab_ptr = w.slab().as_ptr();
        let hot: Vec<u32> = (0..n / 8 + 1).map(|_| rng.below(n) as u32).collect();
        let mut prev: Vec<u32> = Vec::new();
        let mut plan = Plan::default();
        let mut pin_loads = 0u64;
        for step in 0..300 {
            let ctx = format!("seed {seed} step {step} n {n} cap {cap} k {k}");
            match rng.below(100) {
                0 => {
                    w.clear();
                    r.clear();
                }
                1 => {
                    let ids: Vec<u32> = (0..rng.below(4)).map(|_| rng.below(n) as u32).collect();
                    let got = w.pin(&ids);
                    let want = r.pin(&ids);
                    assert_eq!(got.is_ok(), want.is_some(), "{ctx}");
                    if let (Ok(fills), Some(want)) = (got, want) {
                        assert_eq!(fills.iter().map(|f| f.0).collect::<Vec<_>>(), want, "{ctx}");
                        fill(&mut w, &fills);
                        pin_loads += fills.len() as u64;
                    }
                }
                2 => {
                    let bad = vec![0, (n + rng.below(3)) as u32];
                    let before = resident_set(&w);
                    assert!(w.plan_into(&bad, &mut plan).is_err(), "{ctx}");
                    assert!(r.plan(&bad).is_none());
                    assert_eq!(resident_set(&w), before, "{ctx}");
                }
                _ => {
                    let active = random_active(&mut rng, n, cap, &hot, &prev);
                    let before = r.clone();
                    w.plan_into(&active, &mut plan).unwrap();
                    let want = r.plan(&active).unwrap();
                    let got = RefPlan {
                        hits: plan.hits,
                        loads: load_ids(&plan),
                        overflow: plan.overflow.clone(),
                        evicted: plan.evicted,
                    };
                    assert_eq!(got, want, "{ctx} active {active:?}");
                    fill(&mut w, &plan.loads);

                    // Every active neuron is resident or in overflow, not both.
                    for &a in &active {
                        assert_ne!(
                            w.slot(a).is_some(),
                            plan.overflow.binary_search(&a).is_ok(),
                            "{ctx} neuron {a}"
                        );
                    }
                    // Loads got distinct slots that now map back to them.
                    let mut slots: Vec<u32> = plan.loads.iter().map(|l| l.1).collect();
                    slots.sort_unstable();
                    slots.dedup();
                    assert_eq!(slots.len(), plan.loads.len(), "{ctx}");
                    for &(nn, s) in &plan.loads {
                        assert_eq!(w.slot(nn), Some(s));
                    }
                    // A neuron used within the last k tokens leaves only under capacity
                    // pressure, and never while active.
                    let t = r.t;
                    let in_window = |m: usize| k == 0 || before.last_used[m] + k as u64 > t;
                    let window_evictable = (0..n)
                        .filter(|&m| {
                            before.resident[m]
                                && !before.pinned[m]
                                && r.last_used[m] != t
                                && !in_window(m)
                        })
                        .count();
                    let missing = plan.loads.len() + plan.overflow.len();
                    let forced = missing > cap - (before.n_resident() - window_evictable);
                    for m in 0..n {
                        if before.resident[m] && w.slot(m as u32).is_none() {
                            assert_ne!(r.last_used[m], t, "{ctx}: evicted active {m}");
                            assert!(!before.pinned[m], "{ctx}: evicted pinned {m}");
                            if in_window(m) {
                                assert!(forced, "{ctx}: evicted {m} inside the window");
                            }
                        }
                    }
                    prev = active;
                    checked += 1;
                }
            }
            // Same resident and pinned sets; bundles hold what was loaded into them.
            for m in 0..n as u32 {
                assert_eq!(
                    w.slot(m).is_some(),
                    r.resident[m as usize],
                    "{ctx} neuron {m}"
                );
                assert_eq!(w.is_pinned(m), r.pinned[m as usize], "{ctx} neuron {m}");
                if let Some(s) = w.slot(m) {
                    assert_eq!(w.bundle(s), tag(m), "{ctx} neuron {m}");
                }
            }
            assert_eq!(w.resident(), r.n_resident());
            assert!(w.resident() <= cap);
            assert_eq!(w.slab().as_ptr(), slab_ptr, "{ctx}: slab moved");
            w.assert_invariants();
            // Pin fills count as loads but not as needed.
            let s = w.stats();
            assert_eq!(
                s.hits + (s.loads - pin_loads) + s.overflow,
                s.needed,
                "{ctx}"
            );
        }
    }
    assert!(checked > 250_000);
}

// ---------------------------------------------------------------------------------------------
// Cost: nothing per token may scan all neurons or all slots.

#[test]
fn plan_cost_is_independent_of_layer_size() {
    for (capacity, k) in [(1_000_000, 5), (1_000, 5), (64, 0), (4, 2)] {
        let mut w = Window::new(WindowConfig {
            n_neurons: 1_000_000,
            capacity,
            stride: 4,
            k,
        })
        .unwrap();
        let mut rng = Rng::new(capacity as u64);
        let mut plan = Plan::default();
        let mut active = Vec::new();
        let start = Instant::now();
        for _ in 0..10_000 {
            active.clear();
            active.extend((0..8).map(|_| rng.below(1_000_000) as u32));
            w.plan_into(&active, &mut plan).unwrap();
        }
        let elapsed = start.elapsed();
        assert_eq!(w.stats().tokens, 10_000);
        assert!(
            elapsed.as_millis() < 300,
            "capacity {capacity} k {k}: 10k plans took {elapsed:?}"
        );
        if k > 0 {
            assert!(w.resident() <= 8 * k);
        }
    }
}

#[test]
fn pinned_neurons_are_listed_in_id_order_and_survive_plans() {
    let mut w = window(10, 4, 1);
    assert!(w.pinned_neurons().is_empty());
    w.plan(&[2, 8]).unwrap();
    w.pin(&[6, 2]).unwrap();
    assert_eq!(w.pinned_neurons(), vec![2, 6]);
    // Plans that evict every unpinned neuron leave the pinned list as it was.
    w.plan(&[0, 1, 3, 4]).unwrap();
    w.plan(&[5, 7, 9]).unwrap();
    assert_eq!(w.pinned_neurons(), vec![2, 6]);
    w.assert_invariants();
}
