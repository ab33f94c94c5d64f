//! The memory planner: given the user's byte budget, decide what stays resident and how many
//! FFN bundles each layer's window may hold.
//!
//! Everything that is not an FFN bundle is resident: embeddings, attention, norms, the output
//! projection, the predictors, the KV cache and scratch buffers. What is left of the budget
//! becomes window slots, shared between layers in proportion to how many neurons each layer
//! activates per token (a dense layer needs more slots to reach the same hit rate).

use serde::Serialize;

pub mod process;

/// What the model needs, in bytes, apart from the FFN window.
#[derive(Clone, Debug, Serialize)]
pub struct Needs {
    /// Resident tensors of the image apart from `tables` (attention, norms, biases).
    pub resident: u64,
    /// The embedding table and output head (one entry when tied): kept resident when the
    /// budget allows, streamed from the image otherwise.
    pub tables: Vec<Table>,
    /// Memory a streamed table needs (its read staging).
    pub stream_staging: u64,
    /// Predictor weights, all layers.
    pub predictors: u64,
    /// KV cache at the planned context length.
    pub kv_cache: u64,
    /// Per-token scratch: activations, logits, read staging.
    pub scratch: u64,
    /// Bytes of one bundle.
    pub stride: u64,
    /// What the process holds beside all of the above: code, libraries, tokenizer and
    /// metadata tables, thread stacks, allocator slack ([`process::overhead`]); 0 for a
    /// budget of device memory.
    pub process: u64,
    /// Neurons per layer.
    pub neurons: Vec<usize>,
    /// Expected active neurons per token, per layer (from calibration; `neurons` if unknown).
    pub active: Vec<f64>,
}

/// A table that may be streamed instead of held.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub name: String,
    pub bytes: u64,
    /// Streaming it costs about nothing per token (an untied embedding: one row per token);
    /// otherwise streaming reads the whole table every token (an output head).
    pub cheap: bool,
}

/// The planner's decision. Neurons a full window cannot hold are read into a scratch area
/// the size of one layer's active set, so the smallest budget needs no window at all.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub budget: u64,
    pub fixed: u64,
    /// Window slots per layer.
    pub window_slots: Vec<usize>,
    pub window_bytes: u64,
    /// The smallest budget that runs this model: no window, one layer's active set in scratch,
    /// the tables streamed.
    pub minimum: u64,
    /// Tables streamed from the image instead of held.
    pub streamed: Vec<String>,
}

impl Plan {
    /// Expected bytes read from flash per token: per layer, `misses(layer, slots)` bundles
    /// (the active neurons a window of `slots` is expected not to hold), plus each table
    /// streamed whole.
    pub fn expected_reads(&self, needs: &Needs, misses: impl Fn(usize, usize) -> f64) -> f64 {
        let bundles: f64 = (self.window_slots.iter().enumerate())
            .map(|(l, &slots)| misses(l, slots))
            .sum();
        let tables: u64 = (needs.tables.iter())
            .filter(|t| !t.cheap && self.streamed.contains(&t.name))
            .map(|t| t.bytes)
            .sum();
        bundles * needs.stride as f64 + tables as f64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "a budget of {budget} is too small for this model: it needs at least {minimum} \
         ({resident} resident weights{streamable}, {predictors} predictors, {kv} KV cache, \
         {scratch} scratch, {window} for one layer's active neurons, read and staged, \
         {process} for the process itself). Give a larger budget or a shorter context"
    )]
    TooSmall {
        budget: Bytes,
        minimum: Bytes,
        resident: Bytes,
        /// What the resident weights leave out (the tables the plan may stream).
        streamable: &'static str,
        process: Bytes,
        predictors: Bytes,
        kv: Bytes,
        scratch: Bytes,
        window: Bytes,
    },
}

impl BudgetError {
    /// The smallest budget that would have run.
    pub fn minimum(&self) -> u64 {
        match self {
            BudgetError::TooSmall { minimum, .. } => minimum.0,
        }
    }
}

/// Bytes, printed with a binary unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        if b >= (1u64 << 30) as f64 {
            write!(f, "{:.2} GiB", b / (1u64 << 30) as f64)
        } else if b >= (1u64 << 20) as f64 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else {
            write!(f, "{:.0} KiB", b / 1024.0)
        }
    }
}

/// Parses a byte count: `123`, `48MiB`, `1.5GiB`, `512M`, `2G`, `100KB` (K/M/G are powers of
/// 1024, as users of memory budgets expect).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (examples: 48MiB, 1.5GiB, 4096)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use KiB, MiB or GiB)"
            ))
        }
    };
    Ok((value * scale as f64).round() as u64)
}

/// Plans `budget` bytes for a model with `needs`.
pub fn plan(budget: u64, needs: &Needs) -> Result<Plan, BudgetError> {
    // One layer's active bundles, twice: the read pool's staging, where reads land, and the
    // overflow area for neurons the window cannot hold (they are copied from one to the other).
    let one_layer = 2.0 * needs.active.iter().copied().fold(0.0, f64::max) * needs.stride as f64;
    let base = needs.resident
        + needs.process
        + needs.predictors
        + needs.kv_cache
        + needs.scratch
        + one_layer.ceil() as u64;
    let tables: u64 = needs.tables.iter().map(|t| t.bytes).sum();
    let minimum = base + needs.stream_staging * needs.tables.len() as u64;
    if budget < minimum {
        return Err(BudgetError::TooSmall {
            budget: Bytes(budget),
            minimum: Bytes(minimum),
            resident: Bytes(needs.resident),
            streamable: match needs.tables.is_empty() {
                true => "",
                false => " with the embedding and output head streamed",
            },
            process: Bytes(needs.process),
            predictors: Bytes(needs.predictors),
            kv: Bytes(needs.kv_cache),
            scratch: Bytes(
                minimum
                    - needs.resident
                    - needs.process
                    - needs.predictors
                    - needs.kv_cache
                    - one_layer.ceil() as u64,
            ),
            window: Bytes(one_layer.ceil() as u64),
        });
    }
    // Bundles the window would hold with every neuron resident: below that, memory is worth
    // more to the window than to a table that costs nothing to stream (an untied embedding
    // is one row per token). A table that must be read whole every token (the output head)
    // saves no reads by streaming, since what it frees the window reads back at most once:
    // it is streamed only when holding it leaves no room to run.
    let full_window: u64 = needs.neurons.iter().map(|&n| n as u64).sum::<u64>() * needs.stride;
    let mut streamed = Vec::new();
    let mut fixed = base + tables;
    if budget < fixed + full_window {
        for t in needs.tables.iter().filter(|t| t.cheap) {
            fixed = fixed - t.bytes + needs.stream_staging;
            streamed.push(t.name.clone());
        }
    }
    if budget < fixed {
        for t in needs.tables.iter().filter(|t| !t.cheap) {
            fixed = fixed - t.bytes + needs.stream_staging;
            streamed.push(t.name.clone());
        }
    }
    let slots_total = ((budget - fixed) / needs.stride.max(1)) as f64;
    let weight: f64 = needs.active.iter().sum::<f64>().max(1e-9);
    let window_slots: Vec<usize> = needs
        .active
        .iter()
        .zip(&needs.neurons)
        .map(|(&a, &n)| ((slots_total * a / weight).floor() as usize).min(n))
        .collect();
    let window_bytes = window_slots.iter().sum::<usize>() as u64 * needs.stride;
    Ok(Plan {
        budget,
        fixed,
        window_slots,
        window_bytes,
        minimum,
        streamed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs() -> Needs {
        Needs {
            resident: 30 << 20,
            tables: vec![Table {
                name: "token_embd.weight".into(),
                bytes: 10 << 20,
                cheap: false,
            }],
            stream_staging: 1 << 20,
            predictors: 2 << 20,
            kv_cache: 1 << 20,
            scratch: 1 << 20,
            stride: 1000,
            process: 0,
            neurons: vec![1000, 1000],
            active: vec![100.0, 300.0],
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_bytes("48MiB").unwrap(), 48 << 20);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("2g").unwrap(), 2 << 30);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    #[test]
    fn too_small_states_the_minimum() {
        let n = needs();
        let err = plan(10 << 20, &n).unwrap_err();
        let msg = err.to_string();
        // 30 + 2 + 1 + 1 MiB, 2 x 300 bundles of 1000 bytes, 1 MiB of staging for the table.
        assert!(msg.contains("at least 35.6 MiB"), "{msg}");
        assert!(msg.contains("streamed"), "{msg}");
        // The library names no command-line flag: the CLI adds those.
        assert!(!msg.contains("--"), "{msg}");
    }

    #[test]
    fn the_process_overhead_raises_the_minimum_and_shrinks_the_window() {
        let lean = needs();
        let heavy = Needs {
            process: 5 << 20,
            ..needs()
        };
        // Room for part of the window either way (it holds 2 MB in full).
        let budget = 50 << 20;
        let (l, h) = (plan(budget, &lean).unwrap(), plan(budget, &heavy).unwrap());
        assert_eq!(h.minimum, l.minimum + (5 << 20));
        assert_eq!(h.fixed, l.fixed + (5 << 20));
        assert!(h.window_bytes < l.window_bytes, "{l:?} {h:?}");
        let msg = plan(l.minimum, &heavy).unwrap_err().to_string();
        assert!(msg.contains("5.0 MiB for the process itself"), "{msg}");
    }

    #[test]
    fn window_shares_follow_activity_and_fit() {
        let n = needs();
        let fixed = 44 << 20;
        let p = plan(fixed + 600 * 1000 + 800_000, &n).unwrap();
        assert_eq!(p.window_slots, vec![200, 600]);
        assert!(p.fixed + p.window_bytes <= p.budget);
        // A huge budget caps every layer at its neuron count.
        let p = plan(1 << 40, &n).unwrap();
        assert_eq!(p.window_slots, vec![1000, 1000]);
        assert!(p.streamed.is_empty());
    }

    #[test]
    fn a_head_is_streamed_only_when_holding_it_leaves_no_room() {
        let n = needs();
        let base = (34 << 20) + 600 * 1000;
        let p = plan(base + (10 << 20), &n).unwrap();
        assert!(p.streamed.is_empty(), "{p:?}");
        assert_eq!(p.window_slots, vec![0, 0]);
        let p = plan(base + (10 << 20) - 1, &n).unwrap();
        assert_eq!(p.streamed, vec!["token_embd.weight".to_string()]);
        // What the table freed went to the window, which now holds every neuron.
        assert_eq!(p.window_slots, vec![1000, 1000]);
        assert!(p.fixed + p.window_bytes <= p.budget);
    }

    #[test]
    fn an_untied_embedding_is_streamed_before_the_window_shrinks() {
        let mut n = needs();
        n.tables.push(Table {
            name: "output.weight".into(),
            bytes: 10 << 20,
            cheap: false,
        });
        n.tables[0].cheap = true;
        let all = (54 << 20) + 600 * 1000 + 2_000_000;
        assert!(plan(all, &n).unwrap().streamed.is_empty());
        let p = plan(all - 1, &n).unwrap();
        assert_eq!(p.streamed, vec!["token_embd.weight".to_string()]);
        // Far less: the head goes too.
        let p = plan(30 << 20, &n).unwrap_err();
        assert!(p.to_string().contains("at least"));
        let p = plan((36 << 20) + 600 * 1000, &n).unwrap();
        assert_eq!(p.streamed.len(), 2, "{p:?}");
    }

    #[test]
    fn expected_reads_count_missed_bundles_and_whole_streamed_heads() {
        let n = needs();
        let held = plan(60 << 20, &n).unwrap();
        assert!(held.streamed.is_empty());
        let misses = |_: usize, slots: usize| 1000usize.saturating_sub(slots) as f64;
        let by_layer: f64 = held.window_slots.iter().map(|&s| misses(0, s)).sum();
        assert_eq!(held.expected_reads(&n, misses), by_layer * 1000.0);
        // Below what holding the head needs, it is streamed, and read whole every token.
        let tight = plan(40 << 20, &n).unwrap();
        assert_eq!(tight.streamed, vec!["token_embd.weight".to_string()]);
        assert_eq!(tight.expected_reads(&n, |_, _| 0.0), (10 << 20) as f64);
    }
}
