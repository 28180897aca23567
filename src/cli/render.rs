//! Draws the stages' progress events (`crate::progress`): a bar or spinner per task on
//! stderr, only when stderr is a terminal (indicatif hides them otherwise, so logs and tests
//! see just the lines). Notes go to stderr and results to stdout, above any bars.

use crate::progress::{Event, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub struct Render {
    bars: MultiProgress,
    tasks: Mutex<HashMap<u64, ProgressBar>>,
}

impl Render {
    pub fn new() -> Render {
        Render {
            bars: MultiProgress::new(),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    fn with_bar(&self, id: u64, f: impl FnOnce(&ProgressBar)) {
        if let Ok(t) = self.tasks.lock()
            && let Some(pb) = t.get(&id)
        {
            f(pb);
        }
    }
}

impl Default for Render {
    fn default() -> Render {
        Render::new()
    }
}

fn bar(total: u64, label: String) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{spinner} {msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(label);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn spinner(label: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(label);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

impl Observer for Render {
    fn event(&self, e: Event) {
        match e {
            Event::Begin { id, label, total } => {
                let pb = match total {
                    Some(t) => bar(t, label),
                    None => spinner(label),
                };
                let pb = self.bars.add(pb);
                if let Ok(mut t) = self.tasks.lock() {
                    t.insert(id, pb);
                }
            }
            Event::Total { id, total } => self.with_bar(id, |pb| pb.set_length(total)),
            Event::Position { id, done } => self.with_bar(id, |pb| pb.set_position(done)),
            Event::Label { id, label } => self.with_bar(id, |pb| pb.set_message(label)),
            Event::End { id } => {
                let pb = self.tasks.lock().ok().and_then(|mut t| t.remove(&id));
                if let Some(pb) = pb {
                    pb.finish_and_clear();
                    self.bars.remove(&pb);
                }
            }
            Event::Note(l) => self.bars.suspend(|| eprintln!("{l}")),
            Event::Result(l) => self.bars.suspend(|| println!("{l}")),
        }
    }
}
