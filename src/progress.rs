//! Progress as events. Stages report what they are doing (a task with an optional byte
//! total, its position, its end) and lines for the user; they never draw. The CLI installs an
//! [`Observer`] that draws bars on a terminal (`cli::render`). Without one (the library used on
//! its own, unit tests) notes go to stderr, results to stdout, and tasks are silent.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a stage reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A task started: `total` bytes, or `None` for a task without a measure (a spinner).
    Begin {
        id: u64,
        label: String,
        total: Option<u64>,
    },
    /// The task's total became known (a download's Content-Length).
    Total { id: u64, total: u64 },
    /// Bytes done so far.
    Position { id: u64, done: u64 },
    /// The task's label changed (the current file, mmdebstrap's last line).
    Label { id: u64, label: String },
    /// The task ended, successfully or not; a later line says which.
    End { id: u64 },
    /// A line for the user about how the work goes (stderr).
    Note(String),
    /// A line of the command's result (stdout).
    Result(String),
}

/// Receives every event of the process, from any thread.
pub trait Observer: Send + Sync {
    fn event(&self, e: Event);
}

static OBSERVER: OnceLock<Box<dyn Observer>> = OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Installs the process's observer; only the first call counts (the CLI makes it, once).
pub fn set_observer(o: Box<dyn Observer>) {
    let _ = OBSERVER.set(o);
}

fn emit(e: Event) {
    match OBSERVER.get() {
        Some(o) => o.event(e),
        None => match e {
            Event::Note(l) => eprintln!("{l}"),
            Event::Result(l) => println!("{l}"),
            _ => {}
        },
    }
}

/// A line for the user on how the work goes: what was used, skipped or cleaned up.
pub fn note(line: impl Into<String>) {
    emit(Event::Note(line.into()));
}

/// A line of the command's result.
pub fn result(line: impl Into<String>) {
    emit(Event::Result(line.into()));
}

/// A running task. Ends (and its bar goes) when finished or dropped.
pub struct Task {
    id: u64,
    done: AtomicU64,
    ended: std::sync::atomic::AtomicBool,
}

impl Task {
    fn begin(label: String, total: Option<u64>) -> Task {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        emit(Event::Begin { id, label, total });
        Task {
            id,
            done: AtomicU64::new(0),
            ended: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn set_length(&self, total: u64) {
        emit(Event::Total { id: self.id, total });
    }

    pub fn set_position(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        emit(Event::Position { id: self.id, done });
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        emit(Event::Position { id: self.id, done });
    }

    pub fn set_message(&self, label: impl Into<String>) {
        emit(Event::Label {
            id: self.id,
            label: label.into(),
        });
    }

    pub fn finish_and_clear(&self) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            emit(Event::End { id: self.id });
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.finish_and_clear();
    }
}

/// A task measured in bytes (`len` may be 0 until [`Task::set_length`]).
pub fn bytes(len: u64, label: String) -> Task {
    Task::begin(label, Some(len))
}

/// A task without a measure.
pub fn spinner(label: String) -> Task {
    Task::begin(label, None)
}
