//! The k3s release: binary and airgap images for one architecture, verified against the
//! release's own `sha256sum-<arch>.txt`.

use super::{Cache, http, is_sha256_hex};
use crate::config::board::Arch;
use crate::config::inventory::K3s;
use anyhow::{Context, Result, anyhow, bail};
use std::path::PathBuf;

/// Release asset names for an architecture (as published on the k3s release page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    pub binary: String,
    pub images: String,
    pub sums: String,
}

pub fn assets(arch: Arch) -> Assets {
    match arch {
        // The amd64 binary is plain `k3s`; every other architecture has a suffix.
        Arch::Amd64 => Assets {
            binary: "k3s".into(),
            images: "k3s-airgap-images-amd64.tar.zst".into(),
            sums: "sha256sum-amd64.txt".into(),
        },
        Arch::Arm64 => Assets {
            binary: "k3s-arm64".into(),
            images: "k3s-airgap-images-arm64.tar.zst".into(),
            sums: "sha256sum-arm64.txt".into(),
        },
    }
}

/// Percent-encodes a URL path segment (RFC 3986 unreserved characters stay): the `+` in
/// `v1.33.5+k3s1` must travel as `%2B`, or some servers read it as a space.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn asset_url(k3s: &K3s, asset: &str) -> String {
    format!(
        "{}/{}/{}",
        k3s.release_url.trim_end_matches('/'),
        encode_segment(&k3s.version),
        asset
    )
}

/// A file kiln installs, with where it came from (for the manifest and messages).
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: String,
    /// URL, or `--artifact` for a user-supplied file.
    pub source: String,
}

/// The k3s files one node needs.
#[derive(Debug, Clone)]
pub struct K3sFiles {
    /// Release tag, or `custom` when both files came from `--artifact`.
    pub version: String,
    pub binary: Fetched,
    pub images: Fetched,
    /// File name the images keep on the node (k3s loads any archive in its images directory).
    pub images_name: String,
}

/// Parses `sha256sum` output into (hash, name) pairs.
pub fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let h = it.next()?;
            // `sha256sum -b` marks binary files with `*`.
            let name = it.next()?.trim_start_matches('*');
            let name = name.rsplit('/').next().unwrap_or(name);
            is_sha256_hex(&h.to_ascii_lowercase())
                .then(|| (h.to_ascii_lowercase(), name.to_string()))
        })
        .collect()
}

/// The release's checksum list, from the cache when this release was fetched before (a
/// published release never changes), so rebuilds work offline.
fn sums(cache: &Cache, k3s: &K3s, a: &Assets) -> Result<Vec<(String, String)>> {
    let url = asset_url(k3s, &a.sums);
    let key = crate::util::sha256_hex(url.as_bytes());
    let cached = cache.dir("k3s-sums")?.join(format!("{key}.txt"));
    if let Ok(t) = std::fs::read_to_string(&cached) {
        return Ok(parse_sums(&t));
    }
    let text = http::get_text(&url)
        .with_context(|| format!("fetching the k3s {} checksums", k3s.version))?;
    let parsed = parse_sums(&text);
    if parsed.is_empty() {
        bail!("{url}: no sha256 lines found; expected `sha256sum` output");
    }
    crate::util::write_atomic(&cached, text.as_bytes())?;
    Ok(parsed)
}

fn supplied(name: &str, path: &std::path::Path) -> Result<Fetched> {
    Ok(Fetched {
        path: path.to_path_buf(),
        sha256: super::sha256_file(path)?,
        source: format!("--artifact {name}={}", path.display()),
    })
}

/// The k3s files for `arch`: `--artifact` files as given, the rest from the release.
pub fn resolve(
    cache: &Cache,
    input: &crate::plan::K3sInput,
    arch: Arch,
    on_progress: &dyn Fn(&str, u64, Option<u64>),
) -> Result<K3sFiles> {
    let a = assets(arch);
    let from_release = match (&input.binary, &input.images) {
        (Some(_), Some(_)) => None,
        _ => {
            let k3s = input.release.as_ref().ok_or_else(|| {
                anyhow!("no k3s: set [k3s] version in the inventory or pass --artifact k3s= and k3s-images=")
            })?;
            Some(fetch(cache, k3s, arch, on_progress)?)
        }
    };
    let pick = |over: &Option<PathBuf>, name: &str, part: fn(&K3sFiles) -> &Fetched| match over {
        Some(p) => supplied(name, p),
        None => from_release
            .as_ref()
            .map(|r| part(r).clone())
            .ok_or_else(|| anyhow!("no {name}: neither --artifact {name}= nor a [k3s] release")),
    };
    let binary = pick(&input.binary, "k3s", |r| &r.binary)?;
    let images = pick(&input.images, "k3s-images", |r| &r.images)?;
    let version = match (&from_release, input.binary.is_some()) {
        (Some(r), false) => r.version.clone(),
        _ => "custom".to_string(),
    };
    // An override keeps the release's file name unless it is a different kind of archive.
    let images_name = match &input.images {
        Some(p) => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.contains(".tar"))
            .unwrap_or(a.images),
        None => a.images,
    };
    Ok(K3sFiles {
        version,
        binary,
        images,
        images_name,
    })
}

/// Downloads (or finds in the cache) the k3s binary and airgap images for `arch`.
pub fn fetch(
    cache: &Cache,
    k3s: &K3s,
    arch: Arch,
    on_progress: &dyn Fn(&str, u64, Option<u64>),
) -> Result<K3sFiles> {
    let a = assets(arch);
    let sums = sums(cache, k3s, &a)?;
    let want = |name: &str| -> Result<String> {
        sums.iter()
            .find(|(_, n)| n == name)
            .map(|(h, _)| h.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{} lists no `{name}`; is {} a k3s release for {}?",
                    asset_url(k3s, &a.sums),
                    k3s.version,
                    arch.debian()
                )
            })
    };
    let get = |name: &str| -> Result<Fetched> {
        let sha = want(name)?;
        let url = asset_url(k3s, name);
        let path = http::fetch_verified(cache, &url, &sha, &|n, t| on_progress(name, n, t))?;
        Ok(Fetched {
            path,
            sha256: sha,
            source: url,
        })
    };
    let binary = get(&a.binary)?;
    let images = get(&a.images)?;
    Ok(K3sFiles {
        version: k3s.version.clone(),
        binary,
        images,
        images_name: a.images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_is_encoded_and_urls_are_joined() {
        let k = K3s {
            version: "v1.33.5+k3s1".into(),
            release_url: "https://example.invalid/dl/".into(),
        };
        assert_eq!(
            asset_url(&k, "k3s-arm64"),
            "https://example.invalid/dl/v1.33.5%2Bk3s1/k3s-arm64"
        );
    }

    #[test]
    fn sums_parse_text_and_binary_markers() {
        let h = "a".repeat(64);
        let t = format!("{h}  k3s-arm64\n{h} *dist/k3s-airgap-images-arm64.tar.zst\nnot a line\n");
        let p = parse_sums(&t);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].1, "k3s-airgap-images-arm64.tar.zst");
    }
}
