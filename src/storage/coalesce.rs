//! Read coalescing: turn the byte ranges one token needs into few, aligned read operations.

use serde::{Deserialize, Serialize};

/// How [`plan_reads`] may merge ranges into one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoalesceOptions {
    /// Alignment of every op's offset and length: 4096 for direct I/O. 0 is taken as 1.
    pub align: usize,
    /// Merge two neighbouring ranges if the gap between their aligned extents is at most this
    /// many bytes (the gap is read and thrown away). 0 merges only ranges whose pages touch or
    /// overlap.
    pub max_gap: usize,
    /// Soft cap on one op's length. An op is longer only when it cannot be split: a single
    /// range that is longer, or a run of ranges each sharing an aligned page with the ones
    /// before it (ops never overlap, so ranges that share a page share an op).
    pub max_read: usize,
}

impl Default for CoalesceOptions {
    /// 4 KiB alignment, gaps up to 16 KiB merged, reads capped at 1 MiB: on the measured SSD a
    /// 16 KiB gap costs about what one more small read costs, and the probe's curve peaks at
    /// 1 MiB reads (2.0-2.2 GB/s at 1-4 in flight, against 1.2-1.6 for 256 KiB; whole-layer
    /// reads of SmolLM2 measured a median 1.65 GB/s in 1 MiB pieces, 1.33 in 256 KiB ones).
    fn default() -> Self {
        Self {
            align: super::ALIGN,
            max_gap: 16 << 10,
            max_read: 1 << 20,
        }
    }
}

impl CoalesceOptions {
    /// Merges only what must be merged (ranges sharing an aligned page): one op per range
    /// otherwise. The baseline that coalescing is compared against.
    pub fn uncoalesced() -> Self {
        Self {
            align: super::ALIGN,
            max_gap: 0,
            max_read: 0,
        }
    }
}

/// One aligned read covering the input ranges `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOp {
    /// Aligned byte offset in the file.
    pub offset: u64,
    /// Aligned length in bytes.
    pub len: usize,
    /// Index of the first input range this op covers.
    pub first: usize,
    /// Index of the last input range this op covers (inclusive).
    pub last: usize,
}

impl ReadOp {
    /// One past the last byte read.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len as u64)
    }
}

struct Cur {
    start: u64,
    end: u64,
    first: usize,
    last: usize,
    /// The latest index `p` in this op where the op could be cut in two without the halves
    /// sharing a page: (p, aligned end of ranges first..p, aligned start of range p).
    split: Option<(usize, u64, u64)>,
}

impl Cur {
    fn op(&self) -> ReadOp {
        ReadOp {
            offset: self.start,
            len: to_usize(self.end - self.start),
            first: self.first,
            last: self.last,
        }
    }
}

fn to_usize(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// Plans the reads for `ranges` (`(offset, len)`, **sorted by offset**; they may touch or
/// overlap).
///
/// The result is sorted by offset, non-overlapping, aligned to `opts.align`, and its ops cover
/// consecutive index runs `first..=last` that together are `0..ranges.len()`; every non-empty
/// range lies entirely inside the op that covers its index. An op spans exactly the aligned
/// extent of its ranges (plus the gaps merged between them). Zero-length ranges cause no read:
/// they join the op before them (the first op if they lead); if all ranges are empty there are
/// no ops. Ops stay within `opts.max_read` unless that is impossible (see
/// [`CoalesceOptions::max_read`]).
///
/// Unsorted input does not panic, but the guarantees above do not hold for it; callers that
/// take ranges from outside should check the order (as [`ReadPool`](super::ReadPool) does).
pub fn plan_reads(ranges: &[(u64, usize)], opts: &CoalesceOptions) -> Vec<ReadOp> {
    let align = opts.align.max(1) as u64;
    let max_gap = opts.max_gap as u64;
    let max_read = opts.max_read as u64;
    let down = |x: u64| x / align * align;
    let up = |x: u64| x.div_ceil(align).saturating_mul(align);

    let mut ops = Vec::new();
    let mut cur: Option<Cur> = None;
    let mut leading_empty: Option<usize> = None;
    for (i, &(off, len)) in ranges.iter().enumerate() {
        if len == 0 {
            match &mut cur {
                Some(c) => c.last = i,
                None => {
                    leading_empty.get_or_insert(i);
                }
            }
            continue;
        }
        let s = down(off);
        let e = up(off.saturating_add(len as u64));
        let Some(c) = &mut cur else {
            cur = Some(Cur {
                start: s,
                end: e,
                first: leading_empty.take().unwrap_or(i),
                last: i,
                split: None,
            });
            continue;
        };
        let new_start = c.start.min(s);
        let new_end = c.end.max(e);
        let fits = new_end - new_start <= max_read;
        if s < c.end {
            // Shares a page with the op: it must join it, or the op must be cut earlier.
            match c.split {
                Some((p, prefix_end, p_start)) if !fits => {
                    ops.push(ReadOp {
                        offset: c.start,
                        len: to_usize(prefix_end - c.start),
                        first: c.first,
                        last: p - 1,
                    });
                    *c = Cur {
                        start: p_start,
                        end: new_end,
                        first: p,
                        last: i,
                        split: None,
                    };
                }
                _ => {
                    c.start = new_start;
                    c.end = new_end;
                    c.last = i;
                }
            }
        } else if fits && s - c.end <= max_gap {
            c.split = Some((i, c.end, s));
            c.start = new_start;
            c.end = new_end;
            c.last = i;
        } else {
            ops.push(c.op());
            *c = Cur {
                start: s,
                end: e,
                first: i,
                last: i,
                split: None,
            };
        }
    }
    if let Some(c) = cur {
        ops.push(c.op());
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_ranges(rng: &mut Rng, n: usize, align: u64) -> Vec<(u64, usize)> {
        let mut off = rng.below_u64(4 * align);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = match rng.below_u64(10) {
                0 => 0,
                1 => rng.below_u64(3 * align + 1) as usize + 200_000, // long
                2..=5 => 1332,                                        // SmolLM2 bundles
                _ => rng.below_u64(2 * align) as usize + 1,
            };
            out.push((off, len));
            off += match rng.below_u64(6) {
                0 => 0,                         // same offset
                1 => len as u64 / 2,            // overlapping
                2 => len as u64,                // adjacent
                3 => rng.below_u64(3 * align),  // small gap
                _ => rng.below_u64(40 * align), // larger gap
            };
        }
        out
    }

    fn check(ranges: &[(u64, usize)], opts: &CoalesceOptions, ops: &[ReadOp]) {
        let align = opts.align.max(1) as u64;
        let ctx = || format!("opts {opts:?}\nranges {ranges:?}\nops {ops:?}");
        if ranges.iter().all(|r| r.1 == 0) {
            assert!(ops.is_empty(), "{}", ctx());
            return;
        }
        // Index runs partition 0..n in order.
        assert_eq!(ops[0].first, 0, "{}", ctx());
        assert_eq!(ops.last().unwrap().last, ranges.len() - 1, "{}", ctx());
        for w in ops.windows(2) {
            assert_eq!(w[1].first, w[0].last + 1, "{}", ctx());
            // Sorted and non-overlapping.
            assert!(w[0].end() <= w[1].offset, "{}", ctx());
        }
        for op in ops {
            assert!(op.first <= op.last, "{}", ctx());
            assert_eq!(op.offset % align, 0, "{}", ctx());
            assert_eq!(op.len as u64 % align, 0, "{}", ctx());
            assert!(op.len > 0, "{}", ctx());
            let rs: Vec<(u64, u64)> = ranges[op.first..=op.last]
                .iter()
                .filter(|r| r.1 > 0)
                .map(|&(o, l)| (o, o + l as u64))
                .collect();
            assert!(!rs.is_empty(), "{}", ctx());
            // Every range inside; the op is tight (its ends are the ranges' aligned extent).
            for &(s, e) in &rs {
                assert!(op.offset <= s && e <= op.end(), "{}", ctx());
            }
            let lo = rs.iter().map(|r| r.0).min().unwrap() / align * align;
            let hi = rs.iter().map(|r| r.1).max().unwrap().div_ceil(align) * align;
            assert_eq!((op.offset, op.end()), (lo, hi), "{}", ctx());
            // Gaps merged inside the op are within max_gap; over-cap ops are page-connected.
            let mut end = rs[0].1.div_ceil(align) * align;
            let mut connected = true;
            for &(s, e) in &rs[1..] {
                let sa = s / align * align;
                if sa >= end {
                    connected = false;
                    assert!(sa - end <= opts.max_gap as u64, "{}", ctx());
                }
                end = end.max(e.div_ceil(align) * align);
            }
            if op.len > opts.max_read {
                assert!(
                    connected,
                    "op {op:?} over the cap but splittable\n{}",
                    ctx()
                );
            }
        }
    }

    #[test]
    fn properties_on_random_inputs() {
        let mut rng = Rng::new(0x5eed);
        for case in 0..3000 {
            let align = [4096u64, 4096, 512, 1][case % 4];
            let opts = CoalesceOptions {
                align: align as usize,
                max_gap: [0, 4096, 16 << 10, rng.below_u64(100_000) as usize]
                    [rng.below_u64(4) as usize],
                max_read: [
                    0,
                    4096,
                    64 << 10,
                    256 << 10,
                    rng.below_u64(1 << 20) as usize,
                ][rng.below_u64(5) as usize],
            };
            let n = rng.below_u64(80) as usize;
            let ranges = random_ranges(&mut rng, n, align);
            let ops = plan_reads(&ranges, &opts);
            check(&ranges, &opts, &ops);
        }
    }

    #[test]
    fn simple_cases() {
        // The cases below are written for 256 KiB ops.
        let o = CoalesceOptions {
            max_read: 256 << 10,
            ..CoalesceOptions::default()
        };
        assert!(plan_reads(&[], &o).is_empty());
        assert!(plan_reads(&[(5, 0), (9, 0)], &o).is_empty());
        // Adjacent bundles merge; far ones do not.
        let ops = plan_reads(&[(0, 1332), (1332, 1332), (1 << 30, 1332)], &o);
        assert_eq!(
            ops,
            vec![
                ReadOp {
                    offset: 0,
                    len: 4096,
                    first: 0,
                    last: 1
                },
                ReadOp {
                    offset: 1 << 30,
                    len: 4096,
                    first: 2,
                    last: 2
                },
            ]
        );
        // Gap of 16 KiB merged, of 20 KiB not.
        let ops = plan_reads(&[(0, 4096), (20480, 10), (45056, 1)], &o);
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].offset, ops[0].len), (0, 24576));
        // A long range gets its own op.
        let ops = plan_reads(&[(0, 10), (1 << 20, 1 << 20), (3 << 20, 5)], &o);
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[1].len, 1 << 20);
        // Uncoalesced: one op per page-disjoint range, pages shared are merged.
        let u = CoalesceOptions::uncoalesced();
        let ops = plan_reads(&[(0, 1332), (1332, 1332), (8192, 1)], &u);
        assert_eq!(ops.len(), 2);
        // A run of back-to-back 1332-byte bundles shares a page at every boundary: it cannot be
        // cut without overlapping ops, so it is one op over the cap (the pool splits its read).
        let bundles: Vec<(u64, usize)> = (0..1000).map(|i| (i * 1332, 1332)).collect();
        let ops = plan_reads(&bundles, &o);
        check(&bundles, &o, &ops);
        assert_eq!(ops.len(), 1);
        // With page-padded bundles the cap holds.
        let padded: Vec<(u64, usize)> = (0..1000).map(|i| (i * 4096, 1332)).collect();
        let ops = plan_reads(&padded, &o);
        check(&padded, &o, &ops);
        assert!(ops.iter().all(|op| op.len <= o.max_read), "{ops:?}");
        assert_eq!(ops.len(), 1000usize.div_ceil(64));
        // The cut goes where the halves do not share a page: bundles 0..=2 then a gap.
        let r = [
            (0, 1332),
            (1332, 1332),
            (2664, 1332),
            (8192, 4000),
            (12000, 252_000),
        ];
        let ops = plan_reads(&r, &o);
        check(&r, &o, &ops);
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].last, ops[1].first, ops[1].offset), (2, 3, 8192));
    }

    #[test]
    fn no_panic_on_extreme_or_unsorted_input() {
        let o = CoalesceOptions::default();
        let r = [
            (u64::MAX - 10, 100usize),
            (u64::MAX, usize::MAX),
            (3, 5),
            (0, 1),
        ];
        let _ = plan_reads(&r, &o);
        let z = CoalesceOptions {
            align: 0,
            max_gap: usize::MAX,
            max_read: usize::MAX,
        };
        let _ = plan_reads(&r, &z);
    }
}
