//! How many tokens to draft: the length that maximises expected tokens per unit of time.
//!
//! A verify pass over `n` positions costs about `t1 + (n - 1) m`: `t1` a plain step (weights
//! read once, from flash or memory) and `m` each extra position's compute. Drafting `k` tokens
//! costs `k d`, and with a per-token acceptance `a` the pass yields `(1 - a^(k+1)) / (1 - a)`
//! tokens. Under a memory budget `m` is far below `t1` (the reads dominate), so long drafts pay;
//! on a resident model on a few cores `m` is close to `t1`, so only drafts that are usually
//! right pay, and `k = 0` (a plain step) is chosen when none does: speculation then costs
//! nothing. All three are measured as decoding runs (moving averages).

/// Tokens drafted by the first verify pass, before its costs are known.
const FIRST_DRAFT: usize = 2;

/// Weight of a new observation in the moving averages.
const EMA: f64 = 0.2;

/// Acceptance assumed before any draft was verified, and drifted back to during plain steps,
/// so that a source that failed for a while (an n-gram lookup on new text) gets tried again.
const PRIOR_ACCEPTANCE: f64 = 0.6;
const DRIFT: f64 = 0.05;

#[derive(Clone, Debug)]
pub struct DraftLength {
    max: usize,
    min: usize,
    acceptance: f64,
    /// Milliseconds of a plain step, of each extra verified position, of each drafted token.
    step_ms: Option<f64>,
    extra_ms: Option<f64>,
    draft_ms: f64,
}

impl DraftLength {
    /// Lengths between `min` and `max` (`min` is raised to nothing above `max`).
    pub fn new(min: usize, max: usize) -> DraftLength {
        DraftLength {
            max,
            min: min.min(max),
            acceptance: PRIOR_ACCEPTANCE,
            step_ms: None,
            extra_ms: None,
            draft_ms: 0.0,
        }
    }

    /// The draft length for the next pass, at most `limit`. Until a plain step has been timed,
    /// 0 (the first pass measures one) unless a minimum is set.
    pub fn next(&self, limit: usize) -> usize {
        self.next_in_batch(limit, 1)
    }

    /// The draft length for each of `sequences` decoded in one pass (a server's batch): the
    /// plain pass is shared by them all, so each sequence's share of it is what one draft's
    /// extra positions are weighed against. The measurements are the batch's: a plain pass,
    /// and each extra column over all sequences.
    pub fn next_in_batch(&self, limit: usize, sequences: usize) -> usize {
        let limit = limit.min(self.max);
        self.best(limit, sequences.max(1)).max(self.min).min(limit)
    }

    fn best(&self, limit: usize, sequences: usize) -> usize {
        let Some(t1) = self.step_ms else {
            return 0;
        };
        let t1 = t1 / sequences as f64;
        // The first verify pass measures what an extra position costs: short, since where it
        // costs nearly a step (compute-bound runs) a long first guess loses most.
        let Some(m) = self.extra_ms else {
            return limit.min(FIRST_DRAFT);
        };
        let a = self.acceptance.clamp(0.0, 0.999);
        let rate = |k: usize| {
            let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
            tokens / (t1 + k as f64 * (m + self.draft_ms))
        };
        (0..=limit)
            .max_by(|&x, &y| rate(x).total_cmp(&rate(y)))
            .unwrap_or(0)
    }

    /// A plain step took `ms`.
    pub fn stepped(&mut self, ms: f64) {
        self.step_ms = Some(ema(self.step_ms, ms));
        self.acceptance += DRIFT * (PRIOR_ACCEPTANCE - self.acceptance).max(0.0);
    }

    /// `drafted` tokens took `ms` to draft.
    pub fn drafted(&mut self, drafted: usize, ms: f64) {
        if drafted > 0 {
            self.draft_ms = ema(Some(self.draft_ms), ms / drafted as f64);
        }
    }

    /// A verify pass over `drafted + 1` positions took `ms` and kept `kept` drafts.
    pub fn verified(&mut self, drafted: usize, kept: usize, ms: f64) {
        if drafted == 0 {
            return self.stepped(ms);
        }
        let a = kept as f64 / drafted as f64;
        self.acceptance = EMA * a + (1.0 - EMA) * self.acceptance;
        if let Some(t1) = self.step_ms {
            let extra = ((ms - t1) / drafted as f64).max(0.0);
            self.extra_ms = Some(ema(self.extra_ms, extra));
        }
    }
}

fn ema(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => EMA * new + (1.0 - EMA) * o,
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bound_passes_draft_long() {
        let mut l = DraftLength::new(0, 8);
        l.stepped(60.0); // a pass of flash reads
        l.verified(4, 2, 66.0); // extra positions cost little
        assert!(l.next(8) >= 4, "{}", l.next(8));
    }

    #[test]
    fn compute_bound_passes_stop_drafting_when_drafts_fail() {
        let mut l = DraftLength::new(0, 8);
        l.stepped(10.0);
        for _ in 0..10 {
            l.verified(6, 0, 40.0); // each extra position costs half a step, none kept
        }
        assert_eq!(l.next(8), 0);
    }

    #[test]
    fn a_shared_pass_drafts_less_per_sequence() {
        let mut l = DraftLength::new(0, 8);
        l.stepped(60.0);
        l.verified(4, 2, 76.0); // 4 ms per extra column, half the drafts kept
        let (alone, in_eight) = (l.next_in_batch(8, 1), l.next_in_batch(8, 8));
        assert!(alone > in_eight, "{alone} vs {in_eight}");
        assert_eq!(l.next(8), alone);
    }

    #[test]
    fn a_minimum_fixes_the_length() {
        let mut l = DraftLength::new(4, 4);
        assert_eq!(l.next(8), 4);
        l.stepped(10.0);
        l.verified(4, 0, 40.0);
        assert_eq!(l.next(8), 4);
        assert_eq!(l.next(2), 2);
    }

    #[test]
    fn first_pass_is_a_plain_step_and_limit_holds() {
        let mut l = DraftLength::new(0, 8);
        assert_eq!(l.next(8), 0);
        l.stepped(10.0);
        assert_eq!(l.next(1), 1);
        assert_eq!(l.next(8), FIRST_DRAFT);
    }
}
