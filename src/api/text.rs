//! Tokens into the text a user sees: whole UTF-8 characters only, and cut at the first stop
//! string, with nothing of a stop string ever shown (text that could still begin one is held
//! back until the next token decides).

use crate::model::tokenizer::{StreamDecoder, Tokenizer};

/// The text of a generation as its tokens arrive.
#[derive(Debug, Clone)]
pub struct TextStream {
    decoder: StreamDecoder,
    stop: Vec<String>,
    /// Decoded text not yet shown: it may be the start of a stop string.
    held: String,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stop` (empty strings are ignored).
    pub fn new(stop: &[String]) -> TextStream {
        TextStream {
            decoder: StreamDecoder::new(),
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds token `id`; returns the text now safe to show. After a stop string was seen it
    /// returns nothing more, and [`TextStream::stopped`] holds.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        let piece = self.decoder.push(tok, id);
        self.push_text(&piece)
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The rest of the text at the end of the generation (what was held back, and an
    /// incomplete character as U+FFFD).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = self.decoder.finish();
        let mut out = self.push_text(&tail);
        if !self.stopped {
            out.push_str(&std::mem::take(&mut self.held));
        }
        out
    }

    /// Adds decoded text; returns what is safe to show.
    fn push_text(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        if let Some(at) = self.first_stop() {
            self.held.truncate(at);
            self.stopped = true;
            return std::mem::take(&mut self.held);
        }
        let shown = self.held.len() - self.partial_stop_len();
        let rest = self.held.split_off(shown);
        std::mem::replace(&mut self.held, rest)
    }

    /// Where the earliest stop string in the held text begins.
    fn first_stop(&self) -> Option<usize> {
        self.stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// The length of the longest end of the held text that is a proper prefix of a stop
    /// string (on a character boundary): it must wait for the next token.
    fn partial_stop_len(&self) -> usize {
        let h = &self.held;
        let longest = self.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        (1..longest.min(h.len() + 1))
            .rev()
            .filter(|&n| h.is_char_boundary(h.len() - n))
            .find(|&n| {
                let tail = &h[h.len() - n..];
                self.stop.iter().any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a stream ending at `stop` shows for decoded `pieces`, and whether it stopped.
    fn feed(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stop);
        let mut shown: String = pieces.iter().map(|p| s.push_text(p)).collect();
        shown.push_str(&s.finish());
        (shown, s.stopped())
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_never_shown() {
        assert_eq!(feed(&["\n\n"], &["a", "b\n", "\nc"]), ("ab".into(), true));
        assert_eq!(feed(&["END"], &["xE", "N", "Dy"]), ("x".into(), true));
        assert_eq!(feed(&["END"], &["xE", "N", "o"]), ("xENo".into(), false));
        assert_eq!(feed(&[], &["a", "b"]), ("ab".into(), false));
        // The earliest of several.
        assert_eq!(feed(&["b", "a"], &["xab"]), ("x".into(), true));
        // Multi-byte characters at the hold-back boundary.
        assert_eq!(feed(&["é!"], &["café", "?"]), ("café?".into(), false));
    }
}
