//! Progress display (indicatif). Bars draw on stderr only when it is a terminal, so logs and
//! tests see just the summaries.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

pub fn bytes(len: u64, msg: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{spinner} {msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

pub fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}
