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
    }
}
