//! Interrupts and temporary files. Ctrl-C (SIGINT) and SIGTERM run the cleanup actions
//! registered at that moment (remove a build's staging directory, zero a half-written disk's
//! first MiB), then end the process with the signal's default action, so whoever started kiln
//! still sees it killed by that signal. Work that must not be cut in half (moving a finished
//! output set into place, writing a disk's first MiB) runs inside [`critical`]: a signal that
//! arrives meanwhile waits until it is done. SIGKILL cannot be caught; what it leaves behind is
//! found and finished or removed by the next run (see `publish::staging`).
//!
//! signal-hook rather than the `ctrlc` crate `kiln flash` uses: ctrlc allows one handler per
//! process and sees SIGTERM only with a feature that would change flash's behaviour too, and
//! `kiln reimage` builds and then flashes in one process. When the flash step installs ctrlc
//! later, it takes SIGINT over; by then the build has nothing left to clean.

use anyhow::{Result, bail};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

type Action = Box<dyn FnMut() + Send>;

struct Registry {
    next: u64,
    actions: Vec<(u64, Action)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    actions: Vec::new(),
});
/// Held by [`critical`] sections, and by the signal handler while it cleans up.
static CRITICAL: Mutex<()> = Mutex::new(());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A poisoned lock only means another thread panicked while holding it; the data (a list of
/// actions, or nothing) is still usable, and cleanup must still run.
fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unregisters its action when dropped (the work it cleans up after is finished).
#[must_use = "the action is unregistered when the guard is dropped"]
pub struct Guard(u64);

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&REGISTRY).actions.retain(|(id, _)| *id != self.0);
    }
}

/// Runs `action` if SIGINT or SIGTERM arrives before the guard is dropped.
pub fn on_interrupt(action: impl FnMut() + Send + 'static) -> Guard {
    install();
    let mut r = lock(&REGISTRY);
    r.next += 1;
    let id = r.next;
    r.actions.push((id, Box::new(action)));
    Guard(id)
}

/// Whether SIGINT or SIGTERM has arrived (the process is about to end).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

thread_local! {
    static IN_CRITICAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with signals held off: a signal arriving meanwhile is handled when `f` returns.
/// Does not start once a signal has arrived. Must not be nested.
pub fn critical<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let held = lock(&CRITICAL);
    if interrupted() {
        drop(held);
        settle();
        bail!("interrupted");
    }
    IN_CRITICAL.with(|c| c.set(true));
    let r = f();
    IN_CRITICAL.with(|c| c.set(false));
    drop(held);
    settle();
    r
}

/// Once a signal has arrived, the handler thread is cleaning up and will end the process with
/// that signal: the calling thread waits for it rather than racing it to a different exit
/// (a half-done step failing, `main` returning). Returns at once otherwise, and inside a
/// [`critical`] section, which must finish first.
pub fn settle() {
    if interrupted() && !IN_CRITICAL.with(|c| c.get()) {
        loop {
            std::thread::park();
        }
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let started = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).and_then(|mut s| {
            std::thread::Builder::new()
                .name("kiln-signals".into())
                .spawn(move || {
                    if let Some(sig) = s.forever().next() {
                        handle(sig);
                    }
                })
        });
        if let Err(e) = started {
            eprintln!(
                "warning: cannot handle Ctrl-C and SIGTERM ({e}); an interrupted run leaves its \
temporary files for the next run to remove"
            );
        }
    });
}

fn handle(sig: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // Waits for a critical section in progress; none starts after this.
    let _held = lock(&CRITICAL);
    let actions = std::mem::take(&mut lock(&REGISTRY).actions);
    for (_, mut a) in actions.into_iter().rev() {
        a();
    }
    // The default action ends the process, killed by `sig`; exit as a shell would report it if
    // that somehow returns.
    let _ = signal_hook::low_level::emulate_default_handler(sig);
    std::process::exit(128 + sig);
}

/// Removes a directory tree, retrying while threads still at work add to it.
pub fn remove_tree(dir: &std::path::Path) {
    for _ in 0..5 {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return,
        }
    }
}

/// Whether process `pid` exists (Linux: `/proc/PID`). A recycled pid reads as alive, which only
/// keeps a stale file one run longer.
pub fn alive(pid: u32) -> bool {
    pid == std::process::id() || std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes `kiln-mke2fs-PID.conf` files that earlier kiln versions wrote to the temporary
/// directory and left there when killed (kiln now keeps them beside the image it builds).
pub fn sweep_tmp() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("kiln-mke2fs-")
            .and_then(|r| r.strip_suffix(".conf"))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !alive(pid)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// TEST HOOK, honoured only in debug builds (the test suite's; release builds ignore both
/// variables): named points in a run where tests stop or break kiln deterministically.
///
/// - `KILN_TEST_PAUSE_AT=<stage>`: on reaching `stage`, print
///   `kiln: test hook: paused at <stage> (pid N)` on stderr and wait (up to 5 minutes, until a
///   signal arrives, or until the file `KILN_TEST_RESUME_FILE` names exists), so a test can kill
///   kiln exactly there, or let it go on.
/// - `KILN_TEST_FAIL_AT=<stage>`: fail the run there with an error naming the hook.
///
/// Stages: `image` (a node's image is staged), `publish` (its companions are staged), `index`
/// (SHA256SUMS and manifest staged, nothing moved yet), `commit` (the first file of the set has
/// been moved into place), `write-data` (`kiln write`: first MiB zeroed, first data written),
/// `write-head` (`kiln write`: the image's first MiB written, inside the critical section).
pub fn checkpoint(stage: &str) -> Result<()> {
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    let is = |var: &str| std::env::var(var).is_ok_and(|v| v == stage);
    if is("KILN_TEST_FAIL_AT") {
        bail!("test hook KILN_TEST_FAIL_AT={stage}: failing here on purpose");
    }
    if is("KILN_TEST_PAUSE_AT") {
        eprintln!(
            "kiln: test hook: paused at {stage} (pid {})",
            std::process::id()
        );
        let resume = std::env::var_os("KILN_TEST_RESUME_FILE").map(std::path::PathBuf::from);
        let start = Instant::now();
        while !interrupted()
            && start.elapsed() < Duration::from_secs(300)
            && !resume.as_ref().is_some_and(|f| f.exists())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        settle();
    }
    Ok(())
}
