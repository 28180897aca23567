//! Diagnostics that point into a configuration file: `file:line:col: field: message`.
//!
//! Validation collects every problem it finds instead of stopping at the first, so a user fixes
//! an inventory in one pass.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// Dotted path of the offending field, e.g. `node[2].ip`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.field,
            self.message
        )
    }
}

/// All problems found while loading a configuration; displayed one per line.
#[derive(Debug, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A file's text, kept so byte spans can be turned into line and column numbers.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn new(path: &Path, text: String) -> Self {
        Source {
            path: path.to_path_buf(),
            text,
        }
    }

    /// 1-based line and column of a byte offset (clamped to the text).
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text.as_bytes()[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        (line, offset - line_start + 1)
    }

    pub fn diag(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, col) = self.line_col(span.start);
        Diagnostic {
            file: self.path.clone(),
            line,
            col,
            field: field.into(),
            message: message.into(),
        }
    }

    /// Turns a TOML/serde error (syntax, unknown key, wrong type) into a diagnostic whose field
    /// is the key path at the error's span (`node[2].ip`), not the offending value alone.
    pub fn from_toml_error(&self, err: &toml::de::Error) -> Diagnostic {
        let span = err.span().unwrap_or(0..0);
        let message = err.message().trim().to_string();
        let at = toml_path_at(&self.text, span.start);
        // "missing field `ip`": the span is the table that lacks it, so name the field in it.
        let field = match (missing_field(&message), at) {
            (Some(f), Some(t)) if err.span().is_some_and(|s| s.start > 0) => join_key(&t, f),
            (Some(f), _) => f.to_string(),
            (None, Some(t)) => t,
            // Before any key or table (a comment, a stray character): a syntax error only.
            (None, None) => "syntax".to_string(),
        };
        self.diag(span, field, message)
    }
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next().filter(|f| !f.is_empty())
}

/// Dotted key path (`node[2].ip`, `devicetree.copy[0].to`, `network.dns[1]`) of whatever
/// starts at or covers byte `offset` of a TOML text. serde's errors carry a span but not the
/// path, and a message such as "invalid type: string, expected u8" is useless without it; this
/// re-reads the text with a tolerant scanner (a broken document still gets the best guess).
pub fn toml_path_at(text: &str, offset: usize) -> Option<String> {
    let toks = lex(text);
    let mut p = PathScan {
        toks: &toks,
        i: 0,
        offset,
        counts: std::collections::HashMap::new(),
    };
    // An empty key (`"" = 1`, `[]`) names nothing.
    p.document().filter(|path| !path.is_empty())
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Newline,
    Open(u8),
    Close(u8),
    Comma,
    Equals,
    /// A bare word (key, number, boolean, date) or a string, with its text (unquoted).
    Word(String),
}

/// Tokens with their byte spans. Comments are dropped; strings of every TOML form are one
/// token; anything unexpected becomes a one-byte word, so lexing never fails.
fn lex(text: &str) -> Vec<(Tok, Range<usize>)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        match c {
            b'\n' => {
                out.push((Tok::Newline, i..i + 1));
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'[' | b'{' => {
                out.push((Tok::Open(c), i..i + 1));
                i += 1;
            }
            b']' | b'}' => {
                out.push((Tok::Close(c), i..i + 1));
                i += 1;
            }
            b',' => {
                out.push((Tok::Comma, i..i + 1));
                i += 1;
            }
            b'=' => {
                out.push((Tok::Equals, i..i + 1));
                i += 1;
            }
            b'"' | b'\'' => {
                let triple = b.get(i..i + 3) == Some(&[c, c, c][..]);
                let (open, close): (usize, &[u8]) = if triple {
                    (3, if c == b'"' { b"\"\"\"" } else { b"'''" })
                } else {
                    (1, if c == b'"' { b"\"" } else { b"'" })
                };
                i += open;
                let body = i;
                while i < b.len() {
                    if c == b'"' && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if !triple && b[i] == b'\n' {
                        break;
                    }
                    if b[i..].starts_with(close) {
                        break;
                    }
                    i += 1;
                }
                let end = i.min(b.len());
                let s = String::from_utf8_lossy(&b[body..end]).into_owned();
                if b.get(i..).is_some_and(|r| r.starts_with(close)) {
                    i += close.len();
                }
                out.push((Tok::Word(s), start..i.min(b.len())));
            }
            _ => {
                while i < b.len() && !b" \t\r\n#[]{},=\"'".contains(&b[i]) {
                    i += 1;
                }
                if i == start {
                    i += 1;
                }
                let s = String::from_utf8_lossy(&b[start..i]).into_owned();
                out.push((Tok::Word(s), start..i));
            }
        }
    }
    out
}

/// Nesting deeper than any real inventory or profile; past it the outer path is good enough.
const MAX_DEPTH: usize = 32;

struct PathScan<'a> {
    toks: &'a [(Tok, Range<usize>)],
    i: usize,
    offset: usize,
    /// `[[name]]` headers seen so far, for the index of the current one.
    counts: std::collections::HashMap<String, usize>,
}

impl PathScan<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|(t, _)| t)
    }

    /// Whether the token about to be read reaches the offset: the answer is the path there.
    fn reached(&self) -> bool {
        self.toks
            .get(self.i)
            .is_none_or(|(_, s)| s.end > self.offset)
    }

    fn document(&mut self) -> Option<String> {
        let mut table = String::new();
        // At most one pass over the tokens: every loop below consumes at least one.
        while self.i < self.toks.len() {
            match self.peek() {
                Some(Tok::Newline) => self.i += 1,
                Some(Tok::Open(b'[')) => {
                    let at_header = self.reached();
                    let array = matches!(self.toks.get(self.i + 1), Some((Tok::Open(b'['), _)));
                    self.i += if array { 2 } else { 1 };
                    let mut name = String::new();
                    while let Some(Tok::Word(w)) = self.peek() {
                        name.push_str(w);
                        self.i += 1;
                    }
                    table = if array {
                        let n = self.counts.entry(name.clone()).or_insert(0);
                        *n += 1;
                        format!("{name}[{}]", *n - 1)
                    } else {
                        name
                    };
                    if at_header || self.reached() {
                        // A header cut short (`[`) has no name yet: say what it is.
                        return Some(if table.is_empty() {
                            "table header".to_string()
                        } else {
                            table
                        });
                    }
                    self.skip_line();
                }
                Some(_) => {
                    if let Some(found) = self.statement(&table, 0) {
                        return Some(found);
                    }
                    // Whatever else is on the line (a date-time's second half, junk).
                    while !matches!(self.peek(), None | Some(Tok::Newline)) {
                        if self.reached() {
                            return Some(table);
                        }
                        self.i += 1;
                    }
                }
                None => break,
            }
        }
        (!table.is_empty()).then_some(table)
    }

    fn skip_line(&mut self) {
        while let Some(t) = self.peek() {
            let newline = *t == Tok::Newline;
            self.i += 1;
            if newline {
                break;
            }
        }
    }

    /// `key = value` at `prefix`; Some(path) once the offset is reached.
    fn statement(&mut self, prefix: &str, depth: usize) -> Option<String> {
        let Some(Tok::Word(key)) = self.peek().cloned() else {
            if self.reached() {
                return Some(prefix.to_string()).filter(|p| !p.is_empty());
            }
            self.skip_line();
            return None;
        };
        let path = join_key(prefix, &key);
        if self.reached() {
            return Some(path);
        }
        self.i += 1;
        if self.peek() == Some(&Tok::Equals) {
            self.i += 1;
            if let Some(found) = self.value(&path, depth + 1) {
                return Some(found);
            }
        }
        if self.reached() {
            return Some(path);
        }
        None
    }

    /// A value at `path`. `depth` bounds the recursion: a hostile file of nested brackets
    /// must not overflow the stack.
    fn value(&mut self, path: &str, depth: usize) -> Option<String> {
        if depth > MAX_DEPTH {
            return Some(path.to_string());
        }
        match self.peek() {
            Some(Tok::Open(b'[')) => {
                if self.reached() {
                    return Some(path.to_string());
                }
                self.i += 1;
                let mut idx = 0;
                loop {
                    match self.peek() {
                        None => return Some(path.to_string()),
                        Some(Tok::Newline) => self.i += 1,
                        Some(Tok::Comma) => {
                            self.i += 1;
                            idx += 1;
                        }
                        Some(Tok::Close(_)) => {
                            if self.reached() {
                                return Some(path.to_string());
                            }
                            self.i += 1;
                            return None;
                        }
                        Some(_) => {
                            let before = self.i;
                            if let Some(f) = self.value(&format!("{path}[{idx}]"), depth + 1) {
                                return Some(f);
                            }
                            if self.i == before {
                                self.i += 1;
                            }
                        }
                    }
                }
            }
            Some(Tok::Open(_)) => {
                if self.reached() {
                    return Some(path.to_string());
                }
                self.i += 1;
                loop {
                    match self.peek() {
                        None => return Some(path.to_string()),
                        Some(Tok::Newline | Tok::Comma) => self.i += 1,
                        Some(Tok::Close(_)) => {
                            if self.reached() {
                                return Some(path.to_string());
                            }
                            self.i += 1;
                            return None;
                        }
                        Some(Tok::Word(_)) => {
                            let before = self.i;
                            if let Some(f) = self.statement(path, depth + 1) {
                                return Some(f);
                            }
                            if self.i == before {
                                self.i += 1;
                            }
                        }
                        Some(_) => self.i += 1,
                    }
                }
            }
            Some(_) => {
                if self.reached() {
                    return Some(path.to_string());
                }
                self.i += 1;
                None
            }
            None => Some(path.to_string()),
        }
    }
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let s = Source::new(Path::new("x.toml"), "a = 1\nbb = 2\n".to_string());
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        assert_eq!(s.line_col(9), (2, 4));
        assert_eq!(s.line_col(999), (3, 1));
    }

    fn path_of(text: &str, needle: &str) -> Option<String> {
        toml_path_at(text, text.find(needle).expect("needle in text"))
    }

    #[test]
    fn paths_of_keys_values_tables_and_arrays() {
        let t = "a = 1\n[network]\ndns = [\"x\", \"y\"]\n[[node]]\nname = \"a\"\n[[node]]\n\
                 ip = \"300\" # c\n[devicetree]\ncopy = [{ from = \"r\", to = 5 },\n  { to = 6 }]\n\
                 [target.usb]\neeprom = [\n \"p\",\n \"q\"]\n";
        assert_eq!(path_of(t, "a =").as_deref(), Some("a"));
        assert_eq!(path_of(t, "\"y\"").as_deref(), Some("network.dns[1]"));
        assert_eq!(path_of(t, "name").as_deref(), Some("node[0].name"));
        assert_eq!(path_of(t, "\"300\"").as_deref(), Some("node[1].ip"));
        assert_eq!(path_of(t, "5 }").as_deref(), Some("devicetree.copy[0].to"));
        assert_eq!(path_of(t, "6 }").as_deref(), Some("devicetree.copy[1].to"));
        assert_eq!(path_of(t, "\"q\"").as_deref(), Some("target.usb.eeprom[1]"));
        assert_eq!(path_of(t, "[[node]]\nip").as_deref(), Some("node[1]"));
    }

    #[test]
    fn toml_type_errors_name_the_field_path() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct N {
            ip: std::net::Ipv4Addr,
            slot: Option<u8>,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct D {
            node: Vec<N>,
        }
        let text = "[[node]]\nip = \"1.2.3.4\"\n[[node]]\nip = \"1.2.3.4\"\nslot = 300\n[[node]]\nslot = 1\n";
        let src = Source::new(Path::new("x.toml"), text.to_string());
        let err = toml::from_str::<D>(text).unwrap_err();
        let d = src.from_toml_error(&err);
        assert_eq!((d.field.as_str(), d.line), ("node[1].slot", 5), "{d}");
        let text = text.replace("slot = 300", "slot = 3");
        let err = toml::from_str::<D>(&text).unwrap_err();
        let d = Source::new(Path::new("x.toml"), text.clone()).from_toml_error(&err);
        assert_eq!(d.field, "node[2].ip", "{d}");
    }

    #[test]
    fn hostile_nesting_does_not_overflow_the_stack() {
        let t = format!("a = {}", "[".repeat(100_000));
        assert!(toml_path_at(&t, t.len() - 1).is_some());
        let t = "\"unterminated = [\n'''\n{{{{ ,,, ]]] ==\n\"\"\"x".to_string();
        for i in 0..t.len() {
            let _ = toml_path_at(&t, i);
        }
    }
}
