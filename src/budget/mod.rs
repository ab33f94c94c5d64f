//! The memory planner: given the user's byte budget, decide what stays resident and how many
//! FFN bundles each layer's window may hold.
//!
//! Everything that is not an FFN bundle is resident: embeddings, attention, norms, the output
//! projection, the predictors, the KV cache and scratch buffers. What is left of the budget
//! becomes window slots, shared between layers in proportion to how many neurons each layer
//! activates per token (a dense layer needs more slots to reach the same hit rate).

use serde::Serialize;

/// What the model needs, in bytes, apart from the FFN window.
#[derive(Clone, Debug, Serialize)]
pub struct Needs {
    /// Resident tensors of the image apart from `tables` (attention, norms, biases).
    pub resident: u64,
    /// The embedding table and output head (one entry when tied): kept resident when the
    /// budget allows, streamed from the image otherwise.
    pub tables: Vec<(String, u64)>,
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
    /// Neurons per layer.
    pub neurons: Vec<usize>,
    /// Expected active neurons per token, per layer (from calibration; `neurons` if unknown).
    pub active: Vec<f64>,
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

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "a memory budget of {budget} is too small for this model: it needs at least {minimum} \
         ({resident} resident weights with the embedding and output head streamed, {predictors} \
         predictors, {kv} KV cache, {scratch} scratch, {window} for one layer's active neurons). \
         Raise --memory-budget or shorten --ctx"
    )]
    TooSmall {
        budget: Bytes,
        minimum: Bytes,
        resident: Bytes,
        predictors: Bytes,
        kv: Bytes,
        scratch: Bytes,
        window: Bytes,
    },
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

/// Share of the expected active bundles the window should be able to hold before the
/// embedding and output head are worth keeping resident: below it, every token would read
/// most of its FFN again, and streaming the tables (one sequential pass per token) costs less
/// than the FFN reads the freed memory saves.
const WINDOW_BEFORE_TABLES: f64 = 0.25;

/// Plans `budget` bytes for a model with `needs`.
pub fn plan(budget: u64, needs: &Needs) -> Result<Plan, BudgetError> {
    let one_layer = needs.active.iter().copied().fold(0.0, f64::max) * needs.stride as f64;
    let base = needs.resident
        + needs.predictors
        + needs.kv_cache
        + needs.scratch
        + one_layer.ceil() as u64;
    let tables: u64 = needs.tables.iter().map(|t| t.1).sum();
    let staging = needs.stream_staging * needs.tables.len() as u64;
    let minimum = base + staging;
    if budget < minimum {
        return Err(BudgetError::TooSmall {
            budget: Bytes(budget),
            minimum: Bytes(minimum),
            resident: Bytes(needs.resident),
            predictors: Bytes(needs.predictors),
            kv: Bytes(needs.kv_cache),
            scratch: Bytes(needs.scratch + staging),
            window: Bytes(one_layer.ceil() as u64),
        });
    }
    let active_bytes = needs.active.iter().sum::<f64>() * needs.stride as f64;
    let keep_tables = budget as f64 >= (base + tables) as f64 + WINDOW_BEFORE_TABLES * active_bytes;
    let (fixed, streamed) = if keep_tables {
        (base + tables, Vec::new())
    } else {
        (
            base + staging,
            needs.tables.iter().map(|t| t.0.clone()).collect(),
        )
    };
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
            tables: vec![("token_embd.weight".into(), 10 << 20)],
            stream_staging: 1 << 20,
            predictors: 2 << 20,
            kv_cache: 1 << 20,
            scratch: 1 << 20,
            stride: 1000,
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
        // 30 + 2 + 1 + 1 MiB, 300 bundles of 1000 bytes, 1 MiB of staging for the table.
        assert!(msg.contains("at least 35.3 MiB"), "{msg}");
        assert!(msg.contains("--memory-budget"), "{msg}");
    }

    #[test]
    fn window_shares_follow_activity_and_fit() {
        let n = needs();
        let fixed = 44 << 20;
        let p = plan(fixed + 300 * 1000 + 800_000, &n).unwrap();
        assert_eq!(p.window_slots, vec![200, 600]);
        assert!(p.fixed + p.window_bytes <= p.budget);
        // A huge budget caps every layer at its neuron count.
        let p = plan(1 << 40, &n).unwrap();
        assert_eq!(p.window_slots, vec![1000, 1000]);
        assert!(p.streamed.is_empty());
    }

    #[test]
    fn tables_are_streamed_only_when_the_window_would_starve() {
        let n = needs();
        let with_tables = (44 << 20) + 300 * 1000;
        // Room for the tables and a quarter of the active bundles (400 x 1000 bytes): keep.
        let p = plan(with_tables + 100_000, &n).unwrap();
        assert!(p.streamed.is_empty(), "{p:?}");
        // Less: stream them and give their memory to the window.
        let p = plan(with_tables, &n).unwrap();
        assert_eq!(p.streamed, vec!["token_embd.weight".to_string()]);
        assert!(p.window_bytes > 9 << 20, "{p:?}");
        assert!(p.fixed + p.window_bytes <= p.budget);
    }
}
