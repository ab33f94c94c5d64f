//! Parsers for numeric flags: every value checked against its range, with a message that says
//! what was expected and what was given.

/// A whole number in `lo..=hi`.
pub fn count_in(s: &str, lo: usize, hi: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        Ok(v) => Err(format!(
            "{v} is out of range: give a whole number from {lo} to {hi}"
        )),
        Err(_) => Err(format!(
            "`{s}` is not a whole number: give one from {lo} to {hi}"
        )),
    }
}

/// A finite number in `lo..=hi`.
pub fn number_in(s: &str, lo: f64, hi: f64) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (lo..=hi).contains(&v) => Ok(v),
        Ok(v) if !v.is_finite() => Err(format!(
            "{v} is out of range: give a finite number from {lo} to {hi}"
        )),
        Ok(v) => Err(format!(
            "{v} is out of range: give a number from {lo} to {hi}"
        )),
        Err(_) => Err(format!("`{s}` is not a number: give one from {lo} to {hi}")),
    }
}

/// Tokens to generate: 1 to 1,000,000 (a context never holds more).
pub fn tokens(s: &str) -> Result<usize, String> {
    count_in(s, 1, 1_000_000)
}

/// A context length in positions.
pub fn context(s: &str) -> Result<usize, String> {
    count_in(s, 1, 1 << 20)
}

/// Concurrent reads.
pub fn io_threads(s: &str) -> Result<usize, String> {
    count_in(s, 1, 256)
}

/// A sampling temperature: 0 (greedy) to 100.
pub fn temperature(s: &str) -> Result<f32, String> {
    number_in(s, 0.0, 100.0).map(|v| v as f32)
}

/// A nucleus probability: above 0, at most 1.
pub fn top_p(s: &str) -> Result<f32, String> {
    match number_in(s, 0.0, 1.0)? {
        v if v > 0.0 => Ok(v as f32),
        _ => Err("a top-p of 0 keeps no token: give a number above 0, at most 1".into()),
    }
}

/// Chunks of text to score: at least one.
pub fn chunks(s: &str) -> Result<usize, String> {
    count_in(s, 1, 1_000_000)
}

/// Worker threads: 1 to 1024.
pub fn threads(s: &str) -> Result<usize, String> {
    count_in(s, 1, 1024)
}

/// Tokens kept by top-k sampling: 0 (all) up to the largest vocabulary a model may have.
pub fn top_k(s: &str) -> Result<usize, String> {
    count_in(s, 0, 1 << 24)
}

/// A share strictly between 0 and 1 (a sparsity: 0 would skip nothing, 1 everything).
pub fn sparsity(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v < 1.0 => Ok(v),
        Ok(v) => Err(format!(
            "a sparsity of {v} is out of range: give a number above 0 and below 1 (the share of \
             neurons skipped)"
        )),
        Err(_) => Err(format!(
            "`{s}` is not a number: give a sparsity above 0 and below 1"
        )),
    }
}

/// A recall target: above 0, at most 1.
pub fn recall(s: &str) -> Result<f64, String> {
    match number_in(s, 0.0, 1.0)? {
        v if v > 0.0 => Ok(v),
        _ => Err("a recall of 0 keeps no neuron: give a number above 0, at most 1".into()),
    }
}

/// A share from 0 to 1 inclusive.
pub fn share(s: &str) -> Result<f64, String> {
    number_in(s, 0.0, 1.0)
}

/// A density of active neurons: above 0, at most 1.
pub fn density(s: &str) -> Result<f64, String> {
    match number_in(s, 0.0, 1.0)? {
        v if v > 0.0 => Ok(v),
        _ => Err("a density of 0 activates no neuron: give a number above 0, at most 1".into()),
    }
}

/// A predictor rank: 1 to 4096.
pub fn rank(s: &str) -> Result<usize, String> {
    count_in(s, 1, 4096)
}

/// Training epochs: 1 to 10,000.
pub fn epochs(s: &str) -> Result<usize, String> {
    count_in(s, 1, 10_000)
}

/// Calibration tokens to record: at least 16 (15% of them are held out), at most 2^24.
pub fn calibration_tokens(s: &str) -> Result<usize, String> {
    count_in(s, 16, 1 << 24)
}

/// A relative perplexity increase: 0 to 100 (100 = 10,000%).
pub fn increase(s: &str) -> Result<f64, String> {
    number_in(s, 0.0, 100.0)
}

/// Tokens a neuron stays in the window after its last use: 0 to 2^20.
pub fn window(s: &str) -> Result<usize, String> {
    count_in(s, 0, 1 << 20)
}

/// A byte count (`4096`, `16KiB`, `1MiB`) in `lo..=hi`.
pub fn bytes_in(s: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let v = crate::budget::parse_bytes(s)?;
    if (lo..=hi).contains(&v) {
        return Ok(v);
    }
    Err(format!(
        "{v} bytes is out of range: give a size from {lo} bytes to {}",
        crate::budget::Bytes(hi)
    ))
}

/// The largest coalesced read: 4 KiB (one aligned page) to 1 GiB.
pub fn max_read(s: &str) -> Result<u64, String> {
    bytes_in(s, 4096, 1 << 30)
}

/// The largest gap merged between two reads: 0 to 1 GiB.
pub fn max_gap(s: &str) -> Result<u64, String> {
    bytes_in(s, 0, 1 << 30)
}

/// Runs per benchmark configuration: 1 to 1000.
pub fn runs(s: &str) -> Result<usize, String> {
    count_in(s, 1, 1000)
}

/// Rows of a drafting head: 0 up to the largest vocabulary a model may have.
pub fn head_rows(s: &str) -> Result<usize, String> {
    count_in(s, 0, 1 << 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_and_say_why() {
        assert_eq!(tokens("64"), Ok(64));
        assert!(tokens("0").is_err());
        assert!(tokens("18446744073709551615")
            .unwrap_err()
            .contains("1 to 1000000"));
        assert!(temperature("nan").is_err());
        assert!(temperature("-1").is_err());
        assert_eq!(temperature("0"), Ok(0.0));
        assert!(top_p("0").is_err());
        assert!(top_p("1.5").is_err());
        assert!(io_threads("100000").is_err());
        assert!(chunks("0").is_err());
        assert!(threads("0").is_err());
        assert_eq!(threads("4"), Ok(4));
        assert!(top_k("-1").is_err());
        assert_eq!(top_k("0"), Ok(0));
        for bad in ["nan", "inf", "-0.1", "0", "1", "1.5"] {
            assert!(sparsity(bad).is_err(), "{bad}");
        }
        assert_eq!(sparsity("0.5"), Ok(0.5));
        assert!(recall("0").is_err());
        assert!(recall("nan").is_err());
        assert_eq!(recall("1"), Ok(1.0));
        assert!(density("0").is_err());
        assert!(share("1.01").is_err());
        assert!(rank("0").is_err());
        assert!(epochs("0").is_err());
        assert!(calibration_tokens("0").is_err());
        assert!(increase("inf").is_err());
        assert!(max_read("100").unwrap_err().contains("4096 bytes"));
        assert_eq!(max_read("1MiB"), Ok(1 << 20));
        assert!(max_gap("2GiB").is_err());
        assert!(runs("0").is_err());
    }
}
