//! Progress of a long write (one step per layer): a terminal progress bar with the `cli`
//! feature, log lines without it (an embedding application has its own way to show it).

/// Steps done out of a known number.
pub struct Progress {
    #[cfg(feature = "cli")]
    bar: indicatif::ProgressBar,
    #[cfg(not(feature = "cli"))]
    state: Option<(String, u64, u64)>,
}

impl Progress {
    /// A progress of `n` steps of `what`, shown only when `enabled`.
    pub fn new(enabled: bool, n: usize, what: &str) -> Progress {
        #[cfg(feature = "cli")]
        {
            use indicatif::{ProgressBar, ProgressStyle};
            if !enabled {
                return Progress {
                    bar: ProgressBar::hidden(),
                };
            }
            let bar = ProgressBar::new(n as u64);
            let template = "{msg} [{bar:40}] {pos}/{len} layers ({elapsed}, eta {eta})";
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            Progress { bar }
        }
        #[cfg(not(feature = "cli"))]
        Progress {
            state: enabled.then(|| (what.to_string(), 0, n as u64)),
        }
    }

    /// One more step done.
    pub fn inc(&mut self, steps: u64) {
        #[cfg(feature = "cli")]
        self.bar.inc(steps);
        #[cfg(not(feature = "cli"))]
        if let Some((what, done, n)) = &mut self.state {
            *done += steps;
            log::info!("{what}: {done}/{n} layers");
        }
    }

    /// The work is done: the bar goes away.
    pub fn finish(self) {
        #[cfg(feature = "cli")]
        self.bar.finish_and_clear();
    }
}
