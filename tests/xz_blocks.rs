//! The block-wise .xz writer (src/publish/xz.rs): its output checked with xz(1) and liblzma's
//! decoder, the block cache shared between images (what it compresses, what it reuses, that the
//! bytes do not change), and determinism across thread counts.

mod common;

use common::bytes as random;
use kiln::publish::xz::{BLOCK_SIZE, BlockCache, XzWriter};
use kiln::publish::{Format, compress, compress_with};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = BLOCK_SIZE as u64;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-xz-blocks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compressible, like configuration files and logs.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "kubelet",
        "node",
        "cluster",
        "etcd",
        "token",
        "server",
        "agent",
        "image",
        "k3s",
        "= ",
        "\n",
        "true",
        "false",
        "[section]",
        "0.0.0.0",
        "/var/lib/rancher",
        " ",
        "# comment ",
    ];
    let r = random(seed, len);
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[r[i % len] as usize % words.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A sparse file of `size` bytes with `parts` written at their offsets; the rest are holes.
fn sparse(path: &Path, size: u64, parts: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut whole = vec![0u8; size as usize];
    for (off, b) in parts {
        f.write_all_at(b, *off).unwrap();
        whole[*off as usize..*off as usize + b.len()].copy_from_slice(b);
    }
    whole
}

fn xz(args: &[&str], file: &Path) -> std::process::Output {
    let o = Command::new("xz")
        .args(args)
        .arg(file)
        .output()
        .expect("xz(1) is installed (apt-get install xz-utils)");
    assert!(
        o.status.success(),
        "xz {args:?} {}: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Blocks in the .xz, as `xz -l --robot` counts them.
fn xz_blocks(file: &Path) -> u64 {
    let o = xz(&["-l", "--robot"], file);
    let s = String::from_utf8(o.stdout).unwrap();
    let totals = s.lines().find(|l| l.starts_with("totals\t")).unwrap();
    let f: Vec<&str> = totals.split('\t').collect();
    assert_eq!(f[1], "1", "one stream: {totals}");
    assert_eq!(f[6], "CRC64", "{totals}");
    f[2].parse().unwrap()
}

/// Checks `xz_path` with xz(1) and with liblzma's decoder against `raw`.
fn check_xz(xz_path: &Path, raw: &[u8]) {
    xz(&["-t"], xz_path);
    let o = xz(&["-dc"], xz_path);
    assert!(
        o.stdout == raw,
        "xz -dc {} differs from the image",
        xz_path.display()
    );
    let mut dec = liblzma::read::XzDecoder::new_multi_decoder(File::open(xz_path).unwrap());
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut dec, &mut back).unwrap();
    assert!(back == raw, "liblzma's decoder gives other bytes");
    assert_eq!(
        xz_blocks(xz_path),
        (raw.len() as u64).div_ceil(MIB),
        "block count"
    );
}

fn blocks_of(len: u64) -> u64 {
    len.div_ceil(MIB)
}

/// compress() with a fresh cache; returns the .xz bytes.
fn xz_fresh(img: &Path) -> Vec<u8> {
    compress(img, &[Format::Xz], &|_| {}).unwrap();
    std::fs::read(kiln::publish::with_extension(img, "xz")).unwrap()
}

/// compress_with() through `cache`; returns the .xz bytes and checks its FileSum.
fn xz_cached(img: &Path, cache: &BlockCache) -> Vec<u8> {
    let pass = compress_with(img, &[Format::Xz], cache, &|_| {}).unwrap();
    let (f, sum) = &pass.compressed[0];
    assert_eq!(*f, Format::Xz);
    let bytes = std::fs::read(&sum.path).unwrap();
    assert_eq!(sum.size, bytes.len() as u64);
    assert_eq!(sum.sha256, kiln::util::hex(&Sha256::digest(&bytes)));
    bytes
}

/// Random, text and long zero runs (holes and written zeros), ending in a short block.
fn mixed_image(path: &Path) -> Vec<u8> {
    let size = 13 * MIB + 12_345;
    sparse(
        path,
        size,
        &[
            (0, random(1, 3 * MIB as usize)),
            (3 * MIB, text(2, 3 * MIB as usize + 500_000)),
            // 6.5 MiB .. 11 MiB: a hole.
            (11 * MIB, random(3, 100_000)),
            (11 * MIB + 100_000, vec![0; MIB as usize - 100_000]),
            // 12 MiB .. 13 MiB: a hole.
            (13 * MIB, text(4, 12_345)),
        ],
    )
}

#[test]
fn random_text_and_holes_round_trip_through_xz() {
    let d = tmpdir("mixed");
    let img = d.join("n.img");
    let raw = mixed_image(&img);
    let ranges =
        kiln::image::sparse::data_ranges(&File::open(&img).unwrap(), 0, raw.len() as u64).unwrap();
    assert!(ranges.len() >= 2, "the test image has holes: {ranges:?}");

    let pass = compress(&img, &[Format::Xz], &|_| {}).unwrap();
    let xz_path = kiln::publish::with_extension(&img, "xz");
    check_xz(&xz_path, &raw);
    assert_eq!(xz_blocks(&xz_path), 14);
    let bytes = std::fs::read(&xz_path).unwrap();
    assert_eq!(
        pass.compressed[0].1.sha256,
        kiln::util::hex(&Sha256::digest(&bytes))
    );
    assert_eq!(pass.compressed[0].1.size, bytes.len() as u64);
    assert_eq!(pass.raw.sha256, kiln::util::hex(&Sha256::digest(&raw)));
    // The text and zeros compress: the writer did not store everything.
    assert!(bytes.len() < raw.len() * 2 / 5, "{} bytes", bytes.len());

    // The path `kiln flash` takes for an existing .xz: liblzma's decoder, length and sha256.
    let c = kiln::flash::xz::ensure(&img).unwrap();
    assert_eq!(c.length, bytes.len() as u64);
    assert_eq!(c.image_len, raw.len() as u64);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn empty_and_exact_block_multiple_inputs_are_valid() {
    let d = tmpdir("edges");
    for (name, len) in [("empty", 0u64), ("one", MIB), ("two", 2 * MIB), ("tiny", 1)] {
        let img = d.join(format!("{name}.img"));
        let raw = sparse(&img, len, &[(0, random(len, len.min(MIB) as usize))]);
        compress(&img, &[Format::Xz], &|_| {}).unwrap();
        let xz_path = kiln::publish::with_extension(&img, "xz");
        check_xz(&xz_path, &raw);
        assert_eq!(xz_blocks(&xz_path), blocks_of(len), "{name}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Image A (10 distinct data blocks) and B, A with blocks 2 and 7 changed.
fn pair(d: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let a = d.join(format!("{tag}-a.img"));
    let b = d.join(format!("{tag}-b.img"));
    let mut parts = Vec::new();
    for i in 0..10u64 {
        let data = if i % 2 == 0 {
            random(100 + i, MIB as usize)
        } else {
            text(100 + i, MIB as usize)
        };
        parts.push((i * MIB, data));
    }
    sparse(&a, 10 * MIB, &parts);
    parts[2].1[12345] ^= 0xFF;
    parts[7].1[MIB as usize - 1] ^= 0x01;
    sparse(&b, 10 * MIB, &parts);
    (a, b)
}

#[test]
fn second_image_compresses_only_the_blocks_that_differ() {
    let d = tmpdir("shared");
    let (a, b) = pair(&d, "seq");
    let fresh_a = xz_fresh(&a);
    let fresh_b = xz_fresh(&b);
    assert_ne!(fresh_a, fresh_b);

    let cache = BlockCache::new();
    assert_eq!(xz_cached(&a, &cache), fresh_a);
    assert_eq!((cache.compressed_blocks(), cache.reused_blocks()), (10, 0));
    // A's .xz is gone: the cache reads through the handle it kept.
    std::fs::remove_file(kiln::publish::with_extension(&a, "xz")).unwrap();
    assert_eq!(xz_cached(&b, &cache), fresh_b);
    assert_eq!((cache.compressed_blocks(), cache.reused_blocks()), (12, 8));
    // A third time, everything comes from the cache.
    assert_eq!(xz_cached(&a, &cache), fresh_a);
    assert_eq!((cache.compressed_blocks(), cache.reused_blocks()), (12, 18));
    check_xz(
        &kiln::publish::with_extension(&b, "xz"),
        &std::fs::read(&b).unwrap(),
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn concurrent_images_share_blocks_without_compressing_twice() {
    let d = tmpdir("concurrent");
    let (a, b) = pair(&d, "par");
    let fresh_a = xz_fresh(&a);
    let fresh_b = xz_fresh(&b);
    let cache = BlockCache::new();
    let (xa, xb) = std::thread::scope(|s| {
        let ta = s.spawn(|| xz_cached(&a, &cache));
        let tb = s.spawn(|| xz_cached(&b, &cache));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(xa, fresh_a);
    assert_eq!(xb, fresh_b);
    // 12 distinct blocks in 20: each compressed once, whichever image came first.
    assert_eq!((cache.compressed_blocks(), cache.reused_blocks()), (12, 8));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn zero_blocks_are_compressed_once_per_cache() {
    let d = tmpdir("zeros");
    let a = d.join("a.img");
    // Blocks 0 and 7 data, 1..=6 holes, then a 4 KiB hole: a shorter zero block of its own.
    let size = 8 * MIB + 4096;
    let raw_a = sparse(
        &a,
        size,
        &[
            (0, random(7, MIB as usize)),
            (7 * MIB, text(8, MIB as usize)),
        ],
    );
    let cache = BlockCache::new();
    let xa = xz_cached(&a, &cache);
    // Two data blocks, the 1 MiB zero block, the 4 KiB zero block.
    assert_eq!((cache.compressed_blocks(), cache.reused_blocks()), (4, 5));
    check_xz(&kiln::publish::with_extension(&a, "xz"), &raw_a);
    assert_eq!(xa, xz_fresh(&a));

    // Another image that is nothing but holes: no block compressed.
    let z = d.join("z.img");
    let raw_z = sparse(&z, 5 * MIB, &[]);
    let xz_z = xz_cached(&z, &cache);
    assert_eq!((cache.compressed_blocks(), cache.reused_blocks()), (4, 10));
    check_xz(&kiln::publish::with_extension(&z, "xz"), &raw_z);
    assert_eq!(xz_z, xz_fresh(&z));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn output_does_not_depend_on_threads_chunking_or_cache() {
    let d = tmpdir("threads");
    let img = d.join("n.img");
    let raw = mixed_image(&img);
    let reference = xz_fresh(&img);
    let warm = BlockCache::new();
    for (threads, chunk, cache) in [
        (1, 777_777, BlockCache::new()),
        (3, 1 << 20, BlockCache::new()),
        (7, 4096 + 1, warm.clone()),
        (2, 3 << 20, warm.clone()),
    ] {
        let out = d.join(format!("t{threads}-{chunk}.xz"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&out)
            .unwrap();
        let mut w = XzWriter::new(f, &cache, threads).unwrap();
        for c in raw.chunks(chunk) {
            w.write_all(c).unwrap();
        }
        let s = w.finish().unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes == reference, "{threads} threads, {chunk}-byte writes");
        assert_eq!(s.len, bytes.len() as u64);
        assert_eq!(s.blocks, 14);
        assert_eq!(s.sha256, kiln::util::hex(&Sha256::digest(&bytes)));
    }
    // 10 distinct blocks (the 1 MiB zero block five times): the warm cache compressed them once,
    // its second pass nothing.
    assert_eq!(
        (warm.compressed_blocks(), warm.reused_blocks()),
        (10, 4 + 14)
    );
    check_xz(&kiln::publish::with_extension(&img, "xz"), &raw);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_write_only_file_is_refused() {
    let d = tmpdir("wronly");
    let e = XzWriter::new(File::create(d.join("x.xz")).unwrap(), &BlockCache::new(), 1);
    assert!(e.is_err(), "a write-only .xz cannot be read back");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_cached_block_changed_on_disk_is_an_error() {
    let d = tmpdir("changed");
    let (a, b) = pair(&d, "chg");
    let cache = BlockCache::new();
    xz_cached(&a, &cache);
    // Someone rewrites A's .xz in place: block 0 starts after the 12-byte stream header.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(kiln::publish::with_extension(&a, "xz"))
        .unwrap();
    f.write_all_at(b"oops", 20).unwrap();
    let Err(e) = compress_with(&b, &[Format::Xz], &cache, &|_| {}) else {
        panic!("compressed B from a changed .xz");
    };
    assert!(format!("{e:#}").contains("changed on disk"), "{e:#}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Timing, not a check: `KILN_XZ_BENCH=DIR` holding `a.img` and `b.img` (b sharing most blocks
/// with a), then `cargo test --release --test xz_blocks -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench() {
    use std::io::Write;
    use std::time::Instant;
    let Ok(dir) = std::env::var("KILN_XZ_BENCH") else {
        eprintln!("KILN_XZ_BENCH is not set");
        return;
    };
    let dir = Path::new(&dir);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let feed = |img: &Path, w: &mut dyn FnMut(&[u8])| {
        let f = File::open(img).unwrap();
        let len = f.metadata().unwrap().len();
        let mut buf = vec![0u8; 4 << 20];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos).unwrap();
            w(&buf[..n]);
            pos += n as u64;
        }
    };
    let rw = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .unwrap()
    };
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();

    let t = Instant::now();
    let out = dir.join("a.old.xz");
    let stream = liblzma::stream::MtStreamBuilder::new()
        .preset(0)
        .threads(threads as u32)
        .check(liblzma::stream::Check::Crc64)
        .encoder()
        .unwrap();
    let mut e = liblzma::write::XzEncoder::new_stream(rw(&out), stream);
    feed(&a, &mut |c| e.write_all(c).unwrap());
    e.finish().unwrap().sync_all().unwrap();
    println!(
        "old MT stream encoder, a: {:.1} s, {} bytes",
        t.elapsed().as_secs_f64(),
        size(&out)
    );

    let cache = BlockCache::new();
    for (img, name) in [(&a, "a.new.xz"), (&b, "b.new.xz")] {
        let t = Instant::now();
        let out = dir.join(name);
        let mut w = XzWriter::new(rw(&out), &cache, threads).unwrap();
        feed(img, &mut |c| w.write_all(c).unwrap());
        let s = w.finish().unwrap();
        println!(
            "block writer, {name}: {:.1} s, {} bytes, {} blocks; cache: {} compressed, {} reused",
            t.elapsed().as_secs_f64(),
            s.len,
            s.blocks,
            cache.compressed_blocks(),
            cache.reused_blocks()
        );
    }

    // The whole publish pass (raw sha256, bmap ranges, .xz) as a build runs it.
    let cache = BlockCache::new();
    for img in [&a, &b] {
        let t = Instant::now();
        let p = compress_with(img, &[Format::Xz], &cache, &|_| {}).unwrap();
        println!(
            "compress_with {}: {:.1} s, {} bytes; cache: {} compressed, {} reused",
            img.display(),
            t.elapsed().as_secs_f64(),
            p.compressed[0].1.size,
            cache.compressed_blocks(),
            cache.reused_blocks()
        );
    }
}
