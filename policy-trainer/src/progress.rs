//! The training progress bar, or plain log lines when there is no terminal to draw it on.

use crate::metrics::TrainRecord;

pub struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar over `total` steps, `done` of them already taken; `hidden` logs lines instead.
    pub fn new(total: usize, done: usize, hidden: bool) -> Self {
        let bar = if hidden {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total as u64)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_position(done as u64);
        Progress { bar }
    }

    pub fn step(&self, r: &TrainRecord) {
        self.bar.set_position(r.step as u64);
        self.bar.set_message(format!(
            "loss {:.4} acc {:.2} {:.2} ex/s",
            r.loss, r.reward_accuracy, r.examples_per_second
        ));
        if self.bar.is_hidden() {
            tracing::info!(
                "step {} loss {:.4} reward acc {:.3} grad norm {:.3e} {:.2} ex/s",
                r.step,
                r.loss,
                r.reward_accuracy,
                r.grad_norm,
                r.examples_per_second
            );
        }
    }

    /// A line above the bar (or on stderr without one).
    pub fn println(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
