//! A window onto part of the image file (one partition), so filesystem code sees only its bytes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

pub struct Slice<'a> {
    file: &'a File,
    offset: u64,
    len: u64,
    pos: u64,
}

impl<'a> Slice<'a> {
    pub fn new(file: &'a File, offset: u64, len: u64) -> Self {
        Slice {
            file,
            offset,
            len,
            pos: 0,
        }
    }

    pub fn rewind(&mut self) {
        self.pos = 0;
    }
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.offset + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Write for Slice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        if buf.len() as u64 > left {
            return Err(io::Error::other("write past the end of the partition"));
        }
        self.file.write_all_at(buf, self.offset + self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Slice<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_inside_its_window() {
        let path = std::env::temp_dir().join(format!("kiln-slice-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(64).unwrap();
        let mut s = Slice::new(&f, 16, 8);
        s.write_all(b"abcd").unwrap();
        assert!(s.write_all(b"efghi").is_err());
        assert!(s.seek(SeekFrom::Start(9)).is_err());
        let mut all = vec![0u8; 64];
        f.read_exact_at(&mut all, 0).unwrap();
        assert_eq!(&all[16..20], b"abcd");
        assert!(all[..16].iter().all(|b| *b == 0));
        std::fs::remove_file(path).unwrap();
    }
}
