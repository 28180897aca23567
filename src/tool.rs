//! The one runner for external programs (mke2fs, mmdebstrap): an argv list with a human
//! description, never a shell string. A failure's error names the program, its exit status
//! and the last lines of its stderr.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

/// How many of a failed program's last stderr lines its error shows.
pub const TAIL_LINES: usize = 25;

/// The last `TAIL_LINES` lines of `text`, indented for an error message.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let from = lines.len().saturating_sub(TAIL_LINES);
    lines[from..].join("\n  ")
}

pub struct Tool {
    pub description: String,
    pub program: String,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
}

impl Tool {
    pub fn new(description: &str, program: &str) -> Tool {
        Tool {
            description: description.to_string(),
            program: program.to_string(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Tool {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, a: I) -> Tool {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Tool {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn argv(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// The command with its arguments and environment.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `cmd` (from [`Tool::command`]), naming the program when it cannot.
    fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        cmd.spawn().with_context(|| self.cannot_run())
    }

    fn cannot_run(&self) -> String {
        format!(
            "{}: cannot run `{}` (is it installed?)",
            self.description, self.program
        )
    }

    /// Starts the program with a pipe on stdin; stderr is collected by a thread so a chatty
    /// program cannot block on a full pipe.
    pub fn spawn_with_stdin(&self) -> Result<Running> {
        let mut child = self.spawn(
            self.command()
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?;
        let mut stderr = child.stderr.take();
        let collector = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        Ok(Running {
            child,
            collector: Some(collector),
            description: self.description.clone(),
            argv: self.argv(),
        })
    }

    /// Runs to completion, returning stdout.
    pub fn output(&self) -> Result<String> {
        let out = self.command().output().with_context(|| self.cannot_run())?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): `{}`\n  {}",
                self.description,
                out.status,
                self.argv(),
                tail(&String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }
}

pub struct Running {
    pub child: Child,
    collector: Option<std::thread::JoinHandle<String>>,
    description: String,
    argv: String,
}

impl Running {
    /// Closes stdin, waits, and turns a failure into an error with the program's stderr.
    pub fn finish(self) -> Result<()> {
        self.finish_stderr().map(|_| ())
    }

    /// As [`Running::finish`], returning stderr of a program that succeeded (debugfs reports
    /// a failed command only there, with exit status 0).
    pub fn finish_stderr(mut self) -> Result<String> {
        drop(self.child.stdin.take());
        let status = self.child.wait().context("waiting for a child process")?;
        let stderr = self
            .collector
            .take()
            .and_then(|c| c.join().ok())
            .unwrap_or_default();
        if !status.success() {
            bail!(
                "{} failed ({status}): `{}`\n  {}",
                self.description,
                self.argv,
                tail(&stderr)
            );
        }
        Ok(stderr)
    }
}

impl Tool {
    /// Runs a long program to the end: every stderr line goes to `log` and to `on_line`,
    /// stdout to `log` after it. Ctrl-C or SIGTERM of kiln stops the program first (SIGTERM),
    /// so it never outlives kiln. A failure's error holds the last lines and names the log.
    pub fn run_logged(
        &self,
        log: &mut std::fs::File,
        log_path: &std::path::Path,
        on_line: &dyn Fn(&str),
    ) -> Result<()> {
        let _ = writeln!(log, "# {}", self.argv());
        let mut child = self.spawn(
            self.command()
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        // Dropped once the child is reaped: its pid could be reused after that.
        let pid = rustix::process::Pid::from_child(&child);
        let stop_child = crate::cleanup::on_interrupt(move || {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        });
        // stdout is drained by a thread so neither pipe fills.
        let mut stdout = child.stdout.take();
        let drain = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_end(&mut s);
            }
            s
        });
        let mut tail: VecDeque<String> = VecDeque::new();
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines() {
                let line = line.unwrap_or_default();
                let _ = writeln!(log, "{line}");
                on_line(&line);
                tail.push_back(line);
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
            }
        }
        let status = child.wait();
        drop(stop_child);
        let status = status.with_context(|| format!("waiting for {}", self.program))?;
        let _ = log.write_all(&drain.join().unwrap_or_default());
        if !status.success() {
            return Err(anyhow!(
                "{} failed ({status}): `{}`; last lines:\n  {}\nfull log: {}",
                self.description,
                self.argv(),
                Vec::from(tail).join("\n  "),
                log_path.display()
            ));
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // An error path dropped us early: do not leave the program running.
        if self.collector.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatty(code: u32) -> Tool {
        Tool::new("test program", "sh").arg("-c").arg(format!(
            "for i in $(seq 1 40); do echo line$i >&2; done; echo out; exit {code}"
        ))
    }

    #[test]
    fn a_failure_keeps_the_tail_of_stderr_and_names_the_log() {
        let dir = std::env::temp_dir().join(format!("kiln-tool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("run.log");
        let mut log = std::fs::File::create(&log_path).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let e = chatty(3)
            .run_logged(&mut log, &log_path, &|l| {
                seen.lock().unwrap().push(l.to_string())
            })
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("test program failed"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("line40") && msg.contains("line16"), "{msg}");
        assert!(!msg.contains("line15\n"), "more than the tail: {msg}");
        assert!(msg.contains(&log_path.display().to_string()), "{msg}");
        assert_eq!(seen.lock().unwrap().len(), 40);
        let logged = std::fs::read_to_string(&log_path).unwrap();
        assert!(logged.starts_with("# sh -c"), "{logged}");
        assert!(
            logged.contains("line1\n") && logged.contains("out\n"),
            "{logged}"
        );
        chatty(0).run_logged(&mut log, &log_path, &|_| {}).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn output_errors_keep_only_the_tail() {
        let msg = format!("{:#}", chatty(2).output().unwrap_err());
        assert!(msg.contains("line40") && !msg.contains("line1\n"), "{msg}");
        assert!(chatty(0).output().unwrap().contains("out"));
    }

    #[test]
    fn a_missing_program_says_so() {
        let msg = format!(
            "{:#}",
            Tool::new("x", "no-such-kiln-tool").output().unwrap_err()
        );
        assert!(msg.contains("cannot run `no-such-kiln-tool`"), "{msg}");
    }
}
