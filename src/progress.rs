//! Progress of long commands (`models pull`, `profile`, `router train`) on stderr.
//!
//! On a terminal: an `indicatif` bar, redrawn in place, with the rate and time left. Anywhere
//! else (a CI log, journald, a file): a plain line every 5% or every 10 seconds, whichever comes
//! first, and one at the end, because a redrawn bar there is one endless line of carriage
//! returns, and no output at all looks like a hang.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Things done (queries, folds), shown with their rate and time left.
    Items,
    /// Bytes, shown in KB/MB with a transfer rate.
    Bytes,
}

/// How often plain lines are written at most, when no 5% step was crossed.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// One progress display.
pub struct Progress {
    label: String,
    unit: Unit,
    total: u64,
    done: u64,
    started: Instant,
    view: View,
}

enum View {
    Bar(ProgressBar),
    Plain {
        out: Box<dyn Write + Send>,
        /// When a line was last written, and at which twentieth (5% step).
        last: Option<(Instant, u64)>,
    },
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines on stderr otherwise.
    pub fn new(label: &str, total: u64, unit: Unit) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(label, total, unit)
        } else {
            Self::plain_to(label, total, unit, Box::new(std::io::stderr()))
        }
    }

    fn bar(label: &str, total: u64, unit: Unit) -> Self {
        let template = match unit {
            Unit::Items => "{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
            Unit::Bytes => {
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}"
            }
        };
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_owned());
        Self::with_view(label, total, unit, View::Bar(bar))
    }

    /// Plain lines written to `out`.
    pub fn plain_to(label: &str, total: u64, unit: Unit, out: Box<dyn Write + Send>) -> Self {
        Self::with_view(label, total, unit, View::Plain { out, last: None })
    }

    fn with_view(label: &str, total: u64, unit: Unit, view: View) -> Self {
        Self {
            label: label.to_owned(),
            unit,
            total,
            done: 0,
            started: Instant::now(),
            view,
        }
    }

    /// `done` of the total are done; `message` says what is going on now (may be empty).
    pub fn set(&mut self, done: u64, message: &str) {
        self.done = done.min(self.total);
        match &mut self.view {
            View::Bar(bar) => {
                bar.set_position(self.done);
                bar.set_message(message.to_owned());
            }
            View::Plain { last, .. } => {
                let now = Instant::now();
                let step = (20 * self.done).checked_div(self.total).unwrap_or(20);
                let due = match *last {
                    None => true,
                    Some((at, last_step)) => step != last_step || now - at >= PLAIN_EVERY,
                };
                if due {
                    *last = Some((now, step));
                    self.plain(message);
                }
            }
        }
    }

    /// Ends the display with `message` on its own line.
    pub fn finish(&mut self, message: &str) {
        match &mut self.view {
            View::Bar(bar) => {
                bar.finish_and_clear();
                eprintln!("{}: {message}", self.label);
            }
            View::Plain { .. } => self.plain(message),
        }
    }

    /// Writes the plain line for the current count.
    fn plain(&mut self, message: &str) {
        let line = plain_line(
            &self.label,
            self.unit,
            self.done,
            self.total,
            self.started.elapsed(),
            message,
        );
        if let View::Plain { out, .. } = &mut self.view {
            let _ = writeln!(out, "{line}");
        }
    }

    /// Prints a line above the bar (or among the plain lines) without disturbing it.
    pub fn println(&mut self, line: &str) {
        match &mut self.view {
            View::Bar(bar) => bar.println(line),
            View::Plain { out, .. } => {
                let _ = writeln!(out, "{line}");
            }
        }
    }
}

/// `label: 40/100 (40%), 3.2/s, ETA 19s; message`, or in bytes `12.0 MiB/241.0 MiB (5%), ...`.
fn plain_line(
    label: &str,
    unit: Unit,
    done: u64,
    total: u64,
    elapsed: Duration,
    message: &str,
) -> String {
    let percent = (100 * done).checked_div(total).unwrap_or(100);
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        done as f64 / seconds
    } else {
        0.0
    };
    let (count, rate) = match unit {
        Unit::Items => (format!("{done}/{total}"), format!("{rate:.2}/s")),
        Unit::Bytes => (
            format!("{}/{}", HumanBytes(done), HumanBytes(total)),
            format!("{}/s", HumanBytes(rate as u64)),
        ),
    };
    let eta = if done > 0 && done < total {
        let left = seconds / done as f64 * (total - done) as f64;
        HumanDuration(Duration::from_secs_f64(left)).to_string()
    } else {
        "-".to_owned()
    };
    let mut line = format!("{label}: {count} ({percent}%), {rate}, ETA {eta}");
    if !message.is_empty() {
        line.push_str("; ");
        line.push_str(message);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink whose lines the test can read.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default())
                .into_owned()
        }
    }

    #[test]
    fn plain_output_is_a_line_per_5_percent_step_and_one_at_the_end() {
        let lines = Lines::default();
        let mut p = Progress::plain_to("profile", 1000, Unit::Items, Box::new(lines.clone()));
        for done in 1..=1000 {
            p.set(done, "");
        }
        p.finish("done");
        let text = lines.text();
        // The first update, one per 5% step after it, and the finish.
        assert_eq!(text.lines().count(), 1 + 20 + 1, "{text}");
        assert!(text.lines().all(|l| l.starts_with("profile: ")), "{text}");
        assert!(text.contains("profile: 500/1000 (50%)"), "{text}");
        let last = text.lines().last().unwrap_or_default();
        assert!(last.starts_with("profile: 1000/1000 (100%)"), "{last}");
        assert!(last.ends_with("; done"), "{last}");
    }

    #[test]
    fn plain_lines_show_bytes_rate_and_time_left() {
        let line = plain_line(
            "gemma-3-270m",
            Unit::Bytes,
            50 * 1024 * 1024,
            200 * 1024 * 1024,
            Duration::from_secs(10),
            "part 1/4",
        );
        assert_eq!(
            line,
            "gemma-3-270m: 50.00 MiB/200.00 MiB (25%), 5.00 MiB/s, ETA 30 seconds; part 1/4"
        );
        let line = plain_line("train", Unit::Items, 3, 4, Duration::from_secs(6), "");
        assert_eq!(line, "train: 3/4 (75%), 0.50/s, ETA 2 seconds");
    }
}
