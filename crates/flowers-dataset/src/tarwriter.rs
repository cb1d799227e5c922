//! Writes small tar / tar.gz archives, so tests across the workspace can make data sets
//! (feature `testing`).

use std::io::{self, Write};
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;

/// The bytes of a tar archive with `members` (name, contents) as regular files, gzip-compressed
/// when `gzip`. Parent directories get their own entries, as in the real `102flowers.tgz`.
pub fn archive_bytes(members: &[(&str, &[u8])], gzip: bool) -> io::Result<Vec<u8>> {
    let tar = tar_bytes(members)?;
    if !gzip {
        return Ok(tar);
    }
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(&tar)?;
    encoder.finish()
}

/// Writes [`archive_bytes`] to `path`.
pub fn write_archive(path: &Path, members: &[(&str, &[u8])], gzip: bool) -> io::Result<()> {
    std::fs::write(path, archive_bytes(members, gzip)?)
}

fn tar_bytes(members: &[(&str, &[u8])]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs: Vec<&str> = Vec::new();
    for (name, contents) in members {
        if let Some((dir, _)) = name.rsplit_once('/') {
            if !dirs.contains(&dir) {
                dirs.push(dir);
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                header.set_mode(0o755);
                builder.append_data(&mut header, format!("{dir}/"), io::empty())?;
            }
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, *contents)?;
    }
    builder.into_inner()
}
