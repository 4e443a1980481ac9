//! The helper binary gzip-compressed for upload (a third of its size: seconds saved on a slow
//! link the first time a box is reached), made once per binary and kept in the state
//! directory. Must not: talk to the remote (bootstrap does), or trust a cached file it did not
//! check (the cache is keyed by the binary's hash and the gzip stream carries a CRC that the
//! remote `gzip -d` checks).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Compressed copies kept (of recent builds).
const KEPT: usize = 3;

/// The gzip-compressed bytes of `binary`, from the cache in `cache_dir` when it has them.
pub fn gzipped(binary: &Path, cache_dir: Option<&Path>) -> std::io::Result<Vec<u8>> {
    let raw = std::fs::read(binary)?;
    let name = format!("helper-{}.gz", &blake3::hash(&raw).to_hex()[..16]);
    if let Some(dir) = cache_dir
        && let Ok(hit) = std::fs::read(dir.join(&name))
        && hit.len() > 18
    {
        return Ok(hit);
    }
    let mut z = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 2),
        flate2::Compression::new(6),
    );
    z.write_all(&raw)?;
    let packed = z.finish()?;
    if let Some(dir) = cache_dir {
        // A cache that cannot be written only costs compressing again next time.
        let _ = store(dir, &name, &packed);
    }
    Ok(packed)
}

fn store(dir: &Path, name: &str, packed: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, packed)?;
    std::fs::rename(&tmp, dir.join(name))?;
    // Older builds' copies go, but for the few most recent.
    let mut old: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("helper-") && n.ends_with(".gz")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    old.sort();
    for (_, p) in old.iter().rev().skip(KEPT) {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compresses_once_and_round_trips() {
        let td = tempfile::tempdir().unwrap();
        let bin = td.path().join("bin");
        let body: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        std::fs::write(&bin, &body).unwrap();
        let cache = td.path().join("cache");
        let a = gzipped(&bin, Some(&cache)).unwrap();
        assert!(a.len() < body.len() / 3);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&a[..]), &mut back).unwrap();
        assert_eq!(back, body);
        // Second time from the cache (a marker proves it was not recompressed).
        let entry = std::fs::read_dir(&cache)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut marked = a.clone();
        marked.extend_from_slice(b"cached");
        std::fs::write(&entry, &marked).unwrap();
        assert_eq!(gzipped(&bin, Some(&cache)).unwrap(), marked);
        // A different binary gets its own entry; only a few are kept.
        for i in 0..5u8 {
            std::fs::write(&bin, [i; 1000]).unwrap();
            gzipped(&bin, Some(&cache)).unwrap();
        }
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), KEPT);
    }
}
