//! External programs (mke2fs), run from an argv list with a human description; never a shell
//! string. stderr is kept for the error message.

use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::io::Read;
use std::process::{Child, Command, Stdio};

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

    /// Starts the program with a pipe on stdin; stderr is collected by a thread so a chatty
    /// program cannot block on a full pipe.
    pub fn spawn_with_stdin(&self) -> Result<Running> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "{}: cannot run `{}` (is it installed?)",
                self.description, self.program
            )
        })?;
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
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().with_context(|| {
            format!(
                "{}: cannot run `{}` (is it installed?)",
                self.description, self.program
            )
        })?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): `{}`\n{}",
                self.description,
                out.status,
                self.argv(),
                String::from_utf8_lossy(&out.stderr).trim()
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
    pub fn finish(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait().context("waiting for a child process")?;
        let stderr = self
            .collector
            .take()
            .and_then(|c| c.join().ok())
            .unwrap_or_default();
        if !status.success() {
            bail!(
                "{} failed ({status}): `{}`\n{}",
                self.description,
                self.argv,
                stderr.trim()
            );
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
