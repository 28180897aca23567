//! The `.xz` writer: one standard .xz stream (xz file format 1.2.x: stream header, blocks,
//! index, stream footer; CRC64 check) made of independent blocks of [`BLOCK_SIZE`] bytes of the
//! input, each LZMA2-compressed by liblzma's raw encoder on a small pool of threads and written
//! in order. The container around the LZMA2 data is written here.
//!
//! A block's bytes depend only on its input, so a [`BlockCache`] shared by the images of one
//! build compresses a block once: the nodes of a board share most of their bytes at the same
//! offsets, and the images' holes are the same all-zero block over and over.

use anyhow::{Context, Result, anyhow, bail, ensure};
use liblzma::stream::{Action, Filters, LzmaOptions, Status, Stream};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;

/// Uncompressed bytes per block (the last block may be shorter). 1 MiB is what liblzma's own
/// multi-threaded encoder picks for preset 0 (3 × the 256 KiB dictionary, at least 1 MiB), so
/// the ratio stays what it was; and it is small, so a node-specific byte costs one MiB of
/// compression instead of four, and xz's threaded decoder buffers only 1 MiB per thread. The
/// per-block cost is about 30 bytes of header and index, 0.003 %.
pub const BLOCK_SIZE: usize = 1 << 20;

/// Preset 0's dictionary, set explicitly so the filter property below always matches it.
const DICT_SIZE: u32 = 256 << 10;
/// LZMA2 dictionary-size property: size = (2 | (p & 1)) << (p / 2 + 11).
const DICT_PROP: u8 = 12;
const _: () = assert!((2u32 | (DICT_PROP as u32 & 1)) << (DICT_PROP as u32 / 2 + 11) == DICT_SIZE);

const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];
const FOOTER_MAGIC: [u8; 2] = [b'Y', b'Z'];
/// Stream flags: no reserved bits, check type 0x04 (CRC64).
const STREAM_FLAGS: [u8; 2] = [0x00, 0x04];
const CHECK_LEN: u64 = 8;
const FILTER_LZMA2: u64 = 0x21;
/// Block flags: one filter (0), compressed size (0x40) and uncompressed size (0x80) present.
const BLOCK_FLAGS: u8 = 0x40 | 0x80;

/// How many blocks the writer may be ahead of the file (see `XzWriter::max_ahead`).
const MAX_AHEAD: u64 = 64;

/// Compares a block against zeros with memcmp (fast in debug builds too).
static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// All zeros, recognised without hashing.
    Zero(usize),
    /// sha256 and length of the uncompressed bytes.
    Data([u8; 32], usize),
}

/// Where a cached block's encoded bytes are.
enum Store {
    /// Compressed, not yet written by the image that compressed it.
    Memory(Arc<[u8]>),
    /// Written at `offset` of that image's .xz. The handle stays valid when the temporary file is
    /// renamed (or removed after a failure).
    File { file: Arc<File>, offset: u64 },
}

struct Encoded {
    /// The encoded block: header, LZMA2 data, padding, CRC64.
    len: usize,
    /// What the index records: header + LZMA2 data + check, without padding.
    unpadded: u64,
    uncompressed: u64,
    /// CRC32 of the encoded bytes, to notice a .xz changed on disk before it is read back.
    crc32: u32,
    store: Mutex<Store>,
}

/// The result of compressing a block, once per key; the error as text since it is shared.
type Slot = OnceLock<Result<Encoded, String>>;

#[derive(Default)]
struct CacheInner {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    compressed: AtomicU64,
    reused: AtomicU64,
}

/// Encoded .xz blocks shared by the images of one build (cheap to clone; clones share it).
/// Concurrent writers wait for a block another one is compressing instead of compressing it
/// again. It keeps the .xz files it points into open (and, for a failed image, its removed
/// temporary file's space) until dropped.
#[derive(Clone, Default)]
pub struct BlockCache {
    inner: Arc<CacheInner>,
}

/// Mutex contents here stay consistent even if a holder panicked (single assignments and
/// inserts), so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BlockCache {
    pub fn new() -> BlockCache {
        BlockCache::default()
    }

    /// Blocks compressed so far (each distinct block once).
    pub fn compressed_blocks(&self) -> u64 {
        self.inner.compressed.load(Ordering::Relaxed)
    }

    /// Blocks taken from the cache instead of being compressed.
    pub fn reused_blocks(&self) -> u64 {
        self.inner.reused.load(Ordering::Relaxed)
    }

    /// The encoded block for `data`, compressing it only if no image has yet.
    fn block(&self, data: &[u8]) -> Result<Ready> {
        let key = if data.len() <= BLOCK_SIZE && data == &ZEROS[..data.len()] {
            Key::Zero(data.len())
        } else {
            let mut sha = [0u8; 32];
            sha.copy_from_slice(&Sha256::digest(data));
            Key::Data(sha, data.len())
        };
        let slot = lock(&self.inner.slots).entry(key).or_default().clone();
        let mut compressed_here = false;
        let got = slot.get_or_init(|| {
            compressed_here = true;
            encode_block(data).map_err(|e| format!("{e:#}"))
        });
        let enc = match got {
            Ok(enc) => enc,
            Err(e) => {
                // Not kept: a later image tries again (a failure is most likely memory).
                let mut slots = lock(&self.inner.slots);
                if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    slots.remove(&key);
                }
                bail!("compressing an xz block: {e}");
            }
        };
        let counter = if compressed_here {
            &self.inner.compressed
        } else {
            &self.inner.reused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(Ready {
            payload: enc.payload(),
            unpadded: enc.unpadded,
            uncompressed: enc.uncompressed,
            owner: compressed_here.then_some(slot),
        })
    }
}

impl Encoded {
    fn payload(&self) -> Payload {
        match &*lock(&self.store) {
            Store::Memory(b) => Payload::Memory(b.clone()),
            Store::File { file, offset } => Payload::File {
                file: file.clone(),
                offset: *offset,
                len: self.len,
                crc32: self.crc32,
            },
        }
    }
}

/// A block's encoded bytes as the writer gets them.
enum Payload {
    Memory(Arc<[u8]>),
    /// Read back only when written, so a reused block waiting its turn holds no memory.
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
        crc32: u32,
    },
}

/// One block: header (with both sizes), the raw encoder's LZMA2 data, padding to 4 bytes, the
/// CRC64 of `data`.
fn encode_block(data: &[u8]) -> Result<Encoded> {
    let mut opts = LzmaOptions::new_preset(super::XZ_PRESET).context("xz preset")?;
    opts.dict_size(DICT_SIZE);
    let mut filters = Filters::new();
    filters.lzma2(&opts);
    let mut s = Stream::new_raw_encoder(&filters).context("starting the LZMA2 encoder")?;
    // LZMA2 stores incompressible data in chunks of at most 64 KiB with a 3-byte header, so
    // this is enough for one call; the loop is for safety.
    let mut lz: Vec<u8> = Vec::with_capacity(data.len() + data.len() / 1024 + 64);
    loop {
        let done = usize::try_from(s.total_in())
            .ok()
            .and_then(|n| data.get(n..))
            .ok_or_else(|| anyhow!("the LZMA2 encoder consumed more than its input"))?;
        if lz.len() == lz.capacity() {
            lz.reserve(64 << 10);
        }
        match s
            .process_vec(done, &mut lz, Action::Finish)
            .context("LZMA2-compressing a block")?
        {
            Status::StreamEnd => break,
            Status::Ok | Status::GetCheck | Status::MemNeeded => {}
        }
    }
    let comp = lz.len() as u64;
    let uncompressed = data.len() as u64;

    let mut out = Vec::with_capacity(lz.len() + 32);
    out.push(0); // header size, filled in below
    out.push(BLOCK_FLAGS);
    varint(&mut out, comp)?;
    varint(&mut out, uncompressed)?;
    varint(&mut out, FILTER_LZMA2)?;
    varint(&mut out, 1)?; // size of the filter properties
    out.push(DICT_PROP);
    // Header padding: header + its CRC32 is a multiple of 4. At most 2+9+9+3+3+4 bytes, so the
    // size byte ((size / 4) - 1) cannot overflow.
    while (out.len() + 4) % 4 != 0 {
        out.push(0);
    }
    let header_len = out.len() + 4;
    out[0] = (header_len / 4 - 1) as u8;
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&lz);
    while out.len() % 4 != 0 {
        out.push(0); // block padding
    }
    out.extend_from_slice(&crc64(data).to_le_bytes());
    let bytes: Arc<[u8]> = out.into();
    Ok(Encoded {
        len: bytes.len(),
        unpadded: header_len as u64 + comp + CHECK_LEN,
        uncompressed,
        crc32: crc32(&bytes),
        store: Mutex::new(Store::Memory(bytes)),
    })
}

/// xz's variable-length integer: 7 bits a byte, least significant first, at most 9 bytes.
fn varint(out: &mut Vec<u8>, mut n: u64) -> Result<()> {
    ensure!(n < 1 << 63, "{n} is too large for an xz size field");
    while n >= 0x80 {
        out.push((n as u8 & 0x7F) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    Ok(())
}

/// Slice-by-8 tables for a reflected CRC of at most 64 bits.
const fn crc_tables(poly: u64) -> [[u64; 256]; 8] {
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            t[s][i] = (t[s - 1][i] >> 8) ^ t[0][(t[s - 1][i] & 0xFF) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

/// CRC32 (IEEE, as in gzip) and CRC64 (ECMA-182, as in xz), both reflected.
static CRC32_TABLES: [[u64; 256]; 8] = crc_tables(0xEDB8_8320);
static CRC64_TABLES: [[u64; 256]; 8] = crc_tables(0xC96C_5795_D787_0F42);

/// Slice-by-8 over a reflected CRC held in the low bits of a u64 (32 or 64 of them).
fn crc(t: &[[u64; 256]; 8], mut c: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let v = c ^ u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        // A 32-bit CRC XORs only into the low 4 bytes; its high 4 bytes are 0 in `c`, so the
        // same folding works for both widths.
        c = t[7][(v & 0xFF) as usize]
            ^ t[6][((v >> 8) & 0xFF) as usize]
            ^ t[5][((v >> 16) & 0xFF) as usize]
            ^ t[4][((v >> 24) & 0xFF) as usize]
            ^ t[3][((v >> 32) & 0xFF) as usize]
            ^ t[2][((v >> 40) & 0xFF) as usize]
            ^ t[1][((v >> 48) & 0xFF) as usize]
            ^ t[0][(v >> 56) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ b as u64) & 0xFF) as usize] ^ (c >> 8);
    }
    c
}

fn crc32(data: &[u8]) -> u32 {
    // The table entries of a 32-bit polynomial fit in 32 bits.
    (crc(&CRC32_TABLES, 0xFFFF_FFFF, data) ^ 0xFFFF_FFFF) as u32
}

fn crc64(data: &[u8]) -> u64 {
    !crc(&CRC64_TABLES, !0, data)
}

/// A block ready to be written.
struct Ready {
    payload: Payload,
    unpadded: u64,
    uncompressed: u64,
    /// The cache slot this writer compressed: once written, it points at this .xz.
    owner: Option<Arc<Slot>>,
}

struct Job {
    seq: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    result: Result<Ready>,
    /// The input buffer, back for the next block.
    buf: Vec<u8>,
}

/// What [`XzWriter::finish`] wrote.
#[derive(Debug, Clone)]
pub struct XzSummary {
    pub len: u64,
    /// sha256 (hex) of the bytes written.
    pub sha256: String,
    pub blocks: usize,
}

/// Writes one .xz stream to a new, empty file, compressing blocks on `threads` threads.
pub struct XzWriter {
    file: Arc<File>,
    /// Bytes written so far: where the next block goes.
    pos: u64,
    hash: Sha256,
    block: Vec<u8>,
    spare: Vec<Vec<u8>>,
    /// The next block to send to the workers and the next to write.
    next_seq: u64,
    next_write: u64,
    done_early: BTreeMap<u64, Ready>,
    /// (unpadded size, uncompressed size) of every block written: the index.
    records: Vec<(u64, u64)>,
    /// Blocks holding about a block of memory: sent to the workers and not back yet, or back
    /// with their encoded bytes in memory and not written yet. At most `max_heavy`.
    heavy: u64,
    max_heavy: u64,
    /// Reused blocks wait in `done_early` as a location, so the writer can look further ahead
    /// than `max_heavy` (with 2 threads, a changed block every ten keeps both cores busy).
    max_ahead: u64,
    /// Buffer for blocks read back from an earlier .xz.
    readback: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl XzWriter {
    /// `threads` workers (at least one) keep at most 2 × `threads` blocks in flight. The output
    /// does not depend on `threads` or on what `cache` holds. `file` must be open for reading
    /// too: later images read the blocks compressed here back from it.
    pub fn new(file: File, cache: &BlockCache, threads: usize) -> Result<XzWriter> {
        let mode = rustix::fs::fcntl_getfl(&file).context("reading the .xz's open flags")?;
        ensure!(
            mode & rustix::fs::OFlags::ACCMODE == rustix::fs::OFlags::RDWR,
            "the .xz must be open for reading and writing (its blocks are read back for reuse)"
        );
        let threads = threads.clamp(1, 1024);
        let max_heavy = 2 * threads as u64;
        // Never full: at most `max_heavy` jobs are out at once.
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(2 * threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Done>();
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (rx, tx, cache) = (job_rx.clone(), done_tx.clone(), cache.clone());
            let w = std::thread::Builder::new()
                .name("kiln-xz".into())
                .spawn(move || worker(&rx, &tx, &cache))
                .context("starting an xz worker thread")?;
            workers.push(w);
        }
        let mut w = XzWriter {
            file: Arc::new(file),
            pos: 0,
            hash: Sha256::new(),
            block: Vec::with_capacity(BLOCK_SIZE),
            spare: Vec::new(),
            next_seq: 0,
            next_write: 0,
            done_early: BTreeMap::new(),
            records: Vec::new(),
            heavy: 0,
            max_heavy,
            max_ahead: max_heavy.max(MAX_AHEAD),
            readback: Vec::new(),
            jobs: Some(job_tx),
            done: done_rx,
            workers,
        };
        let mut header = HEADER_MAGIC.to_vec();
        header.extend_from_slice(&STREAM_FLAGS);
        header.extend_from_slice(&crc32(&STREAM_FLAGS).to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = (BLOCK_SIZE - self.block.len()).min(buf.len());
            self.block.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.block.len() == BLOCK_SIZE {
                self.submit()?;
            }
        }
        Ok(())
    }

    /// Writes the last blocks, the index and the footer, and syncs the file.
    pub fn finish(mut self) -> Result<XzSummary> {
        if !self.block.is_empty() {
            self.submit()?;
        }
        while self.next_write < self.next_seq {
            self.collect()?;
        }
        let mut index = vec![0x00]; // index indicator
        varint(&mut index, self.records.len() as u64)?;
        for &(unpadded, uncompressed) in &self.records {
            varint(&mut index, unpadded)?;
            varint(&mut index, uncompressed)?;
        }
        while index.len() % 4 != 0 {
            index.push(0);
        }
        let crc = crc32(&index);
        index.extend_from_slice(&crc.to_le_bytes());
        let backward = u32::try_from(index.len() / 4 - 1)
            .map_err(|_| anyhow!("the xz index is too large ({} bytes)", index.len()))?;
        let mut tail = backward.to_le_bytes().to_vec();
        tail.extend_from_slice(&STREAM_FLAGS);
        let mut footer = crc32(&tail).to_le_bytes().to_vec();
        footer.extend_from_slice(&tail);
        footer.extend_from_slice(&FOOTER_MAGIC);
        index.extend_from_slice(&footer);
        self.put(&index)?;
        self.stop_workers();
        self.file.sync_all().context("syncing the .xz")?;
        Ok(XzSummary {
            len: self.pos,
            sha256: crate::util::hex(&std::mem::take(&mut self.hash).finalize()),
            blocks: self.records.len(),
        })
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.file
            .write_all_at(b, self.pos)
            .with_context(|| format!("writing the .xz at byte {}", self.pos))?;
        self.hash.update(b);
        self.pos = self
            .pos
            .checked_add(b.len() as u64)
            .ok_or_else(|| anyhow!("the .xz is too large"))?;
        Ok(())
    }

    fn submit(&mut self) -> Result<()> {
        // collect() cannot wait forever: while a block is unwritten, the first one unwritten
        // is out at a worker (take() writes it as soon as it is back).
        while self.heavy >= self.max_heavy || self.next_seq - self.next_write >= self.max_ahead {
            self.collect()?;
        }
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BLOCK_SIZE));
        let data = std::mem::replace(&mut self.block, next);
        let stopped = || anyhow!("the xz workers stopped");
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(Job {
                seq: self.next_seq,
                data,
            })
            .map_err(|_| stopped())?;
        self.next_seq += 1;
        self.heavy += 1;
        // Write what is ready without waiting, so the file keeps up with the workers.
        while let Ok(d) = self.done.try_recv() {
            self.take(d)?;
        }
        self.write_ready()
    }

    /// Waits for one block, then writes the ones that are next in order.
    fn collect(&mut self) -> Result<()> {
        let d = self
            .done
            .recv()
            .map_err(|_| anyhow!("the xz workers stopped"))?;
        self.take(d)?;
        self.write_ready()
    }

    fn take(&mut self, d: Done) -> Result<()> {
        let mut buf = d.buf;
        buf.clear();
        self.spare.push(buf);
        let r = d.result?;
        if !matches!(r.payload, Payload::Memory(_)) {
            // Its input buffer is back and its bytes are on disk.
            self.heavy = self.heavy.saturating_sub(1);
        }
        self.done_early.insert(d.seq, r);
        Ok(())
    }

    fn write_ready(&mut self) -> Result<()> {
        while let Some(r) = self.done_early.remove(&self.next_write) {
            let offset = self.pos;
            match &r.payload {
                Payload::Memory(b) => {
                    self.put(b)?;
                    self.heavy = self.heavy.saturating_sub(1);
                }
                Payload::File {
                    file,
                    offset: at,
                    len,
                    crc32: sum,
                } => {
                    let mut buf = std::mem::take(&mut self.readback);
                    read_back(file, *at, *len, *sum, &mut buf)?;
                    self.put(&buf)?;
                    self.readback = buf;
                }
            }
            if let Some(slot) = r.owner
                && let Some(Ok(enc)) = slot.get()
            {
                // Later images read it from here; the bytes in memory are dropped.
                *lock(&enc.store) = Store::File {
                    file: self.file.clone(),
                    offset,
                };
            }
            self.records.push((r.unpadded, r.uncompressed));
            self.next_write += 1;
        }
        Ok(())
    }

    fn stop_workers(&mut self) {
        self.jobs = None; // workers see the channel close once it is empty
        for w in self.workers.drain(..) {
            // A worker catches its jobs' panics; nothing to report from one that still died.
            let _ = w.join();
        }
    }
}

impl Drop for XzWriter {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Reads a block an earlier image wrote, checking it is still what was written there.
fn read_back(file: &File, at: u64, len: usize, sum: u32, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(len, 0);
    file.read_exact_at(buf, at)
        .with_context(|| format!("reading a cached xz block back (offset {at})"))?;
    ensure!(
        crc32(buf) == sum,
        "a cached xz block (offset {at} of an earlier .xz of this build) changed on disk"
    );
    Ok(())
}

fn worker(jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>, cache: &BlockCache) {
    loop {
        let Ok(job) = lock(jobs).recv() else { return };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.block(&job.data)))
                .unwrap_or_else(|_| Err(anyhow!("the xz encoder panicked")));
        let d = Done {
            seq: job.seq,
            result,
            buf: job.data,
        };
        if done.send(d).is_err() {
            return; // the writer is gone
        }
    }
}
