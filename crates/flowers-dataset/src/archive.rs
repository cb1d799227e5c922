//! Streaming reader of `102flowers.tgz` / `.tar`: JPEG members in archive order, never
//! extracted to disk.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use flate2::bufread::MultiGzDecoder;

use crate::DatasetError;

/// The image number of a member name: `jpg/image_00042.jpg` -> 42. `None` for anything that is
/// not an `image_<digits>.jpg` (or `.jpeg`) file.
pub fn image_number(name: &str) -> Option<u32> {
    let file = name.rsplit('/').next()?;
    let (stem, ext) = file.rsplit_once('.')?;
    if !(ext.eq_ignore_ascii_case("jpg") || ext.eq_ignore_ascii_case("jpeg")) {
        return None;
    }
    let digits = stem.strip_prefix("image_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One JPEG member of the archive.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// The member's path inside the archive, e.g. `jpg/image_00042.jpg`.
    pub name: String,
    pub number: u32,
    pub bytes: Vec<u8>,
}

type Stream = Arc<Mutex<Box<dyn Read + Send>>>;

/// The decompressed stream as the tar reader sees it. It records whether the stream reached its
/// end (`tar` treats a clean end of input at a header boundary like the end-of-archive marker, so
/// this is how a cut archive is told apart), and it is shared so that the rest of the stream can
/// be drained after the marker, which makes the gzip decoder check its trailer.
struct TrackedStream {
    inner: Stream,
    hit_eof: Arc<AtomicBool>,
}

impl Read for TrackedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = lock(&self.inner).read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof.store(true, Ordering::Relaxed);
        }
        Ok(n)
    }
}

fn lock(stream: &Stream) -> std::sync::MutexGuard<'_, Box<dyn Read + Send>> {
    // Only the reading thread uses the stream; a poisoned lock still holds a usable reader.
    stream
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tar archive, gzip-compressed or not (detected from the magic bytes `1f 8b`, not the name).
pub struct ArchiveReader {
    path: PathBuf,
    gzip: bool,
    archive: tar::Archive<TrackedStream>,
    stream: Stream,
    hit_eof: Arc<AtomicBool>,
    seen: HashSet<u32>,
    ignored: usize,
}

impl ArchiveReader {
    pub fn open(path: &Path) -> Result<Self, DatasetError> {
        let io_err = |source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut buffered = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err)?);
        let gzip = buffered
            .fill_buf()
            .map_err(io_err)?
            .starts_with(&[0x1f, 0x8b]);
        let stream: Box<dyn Read + Send> = if gzip {
            Box::new(MultiGzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        let stream = Arc::new(Mutex::new(stream));
        let hit_eof = Arc::new(AtomicBool::new(false));
        let tracked = TrackedStream {
            inner: Arc::clone(&stream),
            hit_eof: Arc::clone(&hit_eof),
        };
        Ok(Self {
            path: path.to_path_buf(),
            gzip,
            archive: tar::Archive::new(tracked),
            stream,
            hit_eof,
            seen: HashSet::new(),
            ignored: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the archive is gzip-compressed.
    pub fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// Members skipped so far because they are not `image_<n>.jpg` files (directories, others).
    pub fn ignored(&self) -> usize {
        self.ignored
    }

    /// The JPEG members in archive order. Ends after the first error (a truncated or corrupt
    /// archive, a duplicate image), which names the archive and the member.
    pub fn images(&mut self) -> Result<Images<'_>, DatasetError> {
        let entries = self.archive.entries().map_err(|source| DatasetError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(Images {
            entries,
            path: &self.path,
            stream: &self.stream,
            hit_eof: &self.hit_eof,
            seen: &mut self.seen,
            ignored: &mut self.ignored,
            done: false,
        })
    }
}

/// Iterator over an archive's JPEG members; see [`ArchiveReader::images`].
pub struct Images<'a> {
    entries: tar::Entries<'a, TrackedStream>,
    path: &'a Path,
    stream: &'a Stream,
    hit_eof: &'a AtomicBool,
    seen: &'a mut HashSet<u32>,
    ignored: &'a mut usize,
    done: bool,
}

impl Images<'_> {
    /// Ends the iteration on `error`.
    fn broken(&mut self, error: DatasetError) -> Option<Result<ArchiveImage, DatasetError>> {
        self.done = true;
        Some(Err(error))
    }

    fn truncated(&mut self, message: String) -> Option<Result<ArchiveImage, DatasetError>> {
        self.broken(DatasetError::Archive {
            path: self.path.to_path_buf(),
            message,
        })
    }
}

impl Iterator for Images<'_> {
    type Item = Result<ArchiveImage, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let mut entry = match self.entries.next() {
                None if self.hit_eof.load(Ordering::Relaxed) => {
                    return self.truncated("input ends before the end-of-archive marker".into())
                }
                None => {
                    // Past the marker there is only padding; reading it to the end makes the
                    // gzip decoder verify its checksum and length trailer.
                    if let Err(source) = io::copy(&mut *lock(self.stream), &mut io::sink()) {
                        return self.broken(DatasetError::ArchiveTrailer {
                            path: self.path.to_path_buf(),
                            source,
                        });
                    }
                    self.done = true;
                    return None;
                }
                Some(Err(source)) => {
                    return self.broken(DatasetError::ArchiveHeader {
                        path: self.path.to_path_buf(),
                        source,
                    })
                }
                Some(Ok(entry)) => entry,
            };
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let number = match image_number(&name) {
                Some(n) if entry.header().entry_type().is_file() => n,
                _ => {
                    tracing::debug!(member = %name, "ignoring non-image archive member");
                    *self.ignored += 1;
                    continue;
                }
            };
            let size = entry.size();
            let mut bytes = Vec::with_capacity(size as usize);
            if let Err(source) = entry.read_to_end(&mut bytes) {
                return self.broken(DatasetError::ArchiveMember {
                    path: self.path.to_path_buf(),
                    member: name,
                    source,
                });
            }
            // A short read is not an error for the tar reader: the input just ended.
            if bytes.len() as u64 != size {
                return self.truncated(format!("{name}: has {} of {size} bytes", bytes.len()));
            }
            if !self.seen.insert(number) {
                return self.broken(DatasetError::DuplicateImage {
                    path: self.path.to_path_buf(),
                    member: name,
                });
            }
            return Some(Ok(ArchiveImage {
                name,
                number,
                bytes,
            }));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarwriter::{archive_bytes, write_archive};

    fn read_all(path: &Path) -> Result<Vec<ArchiveImage>, DatasetError> {
        ArchiveReader::open(path)?.images()?.collect()
    }

    #[test]
    fn image_numbers_from_member_names() {
        assert_eq!(image_number("jpg/image_00042.jpg"), Some(42));
        assert_eq!(image_number("image_8189.JPG"), Some(8189));
        assert_eq!(image_number("a/b/image_00001.jpeg"), Some(1));
        assert_eq!(image_number("jpg/"), None);
        assert_eq!(image_number("jpg/image_00042.png"), None);
        assert_eq!(image_number("jpg/._image_00042.jpg"), None);
        assert_eq!(image_number("jpg/image_.jpg"), None);
        assert_eq!(image_number("jpg/image_12a.jpg"), None);
    }

    #[test]
    fn gzip_is_detected_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let members: [(&str, &[u8]); 2] = [
            ("jpg/image_00007.jpg", b"seven"),
            ("jpg/image_00003.jpg", b"three"),
        ];
        // A gzip file named .tar and a plain tar named .tgz both read.
        let gz_named_tar = dir.path().join("a.tar");
        write_archive(&gz_named_tar, &members, true).unwrap();
        let tar_named_tgz = dir.path().join("b.tgz");
        write_archive(&tar_named_tgz, &members, false).unwrap();
        for (path, gzip) in [(gz_named_tar, true), (tar_named_tgz, false)] {
            let mut reader = ArchiveReader::open(&path).unwrap();
            assert_eq!(reader.is_gzip(), gzip);
            let images: Vec<_> = reader.images().unwrap().map(Result::unwrap).collect();
            assert_eq!(images.iter().map(|i| i.number).collect::<Vec<_>>(), [7, 3]);
            assert_eq!(images[0].name, "jpg/image_00007.jpg");
            assert_eq!(images[1].bytes, b"three");
            // The `jpg/` directory entry was skipped.
            assert_eq!(reader.ignored(), 1);
        }
    }

    #[test]
    fn other_members_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.tar");
        write_archive(
            &path,
            &[
                ("README.txt", b"hello"),
                ("jpg/image_00001.jpg", b"one"),
                ("jpg/notes.jpg", b"no number"),
            ],
            false,
        )
        .unwrap();
        let images = read_all(&path).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].number, 1);
    }

    #[test]
    fn truncated_archives_are_errors_naming_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        // Incompressible, so that cuts of the gzip stream land inside member data.
        let mut state = 1u32;
        let big: Vec<u8> = (0..20_000)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let members: [(&str, &[u8]); 3] = [
            ("jpg/image_00001.jpg", &big),
            ("jpg/image_00002.jpg", &big),
            ("jpg/image_00003.jpg", &big),
        ];
        for gzip in [false, true] {
            let full = archive_bytes(&members, gzip).unwrap();
            // Cut mid-member, and in the gzip trailer / the end-of-archive marker; plain tar
            // also exactly at a member boundary (dir header + header + 20_000 padded to 20_480).
            let cuts = if gzip {
                vec![full.len() / 2, full.len() - 4]
            } else {
                vec![full.len() / 2, full.len() - 700, 512 + 512 + 20_480]
            };
            for cut in cuts {
                let path = dir.path().join(format!("cut-{gzip}-{cut}.tgz"));
                std::fs::write(&path, &full[..cut]).unwrap();
                let err = match read_all(&path) {
                    Ok(images) => panic!("gzip={gzip} cut={cut}: read {} images", images.len()),
                    Err(e) => e.to_string(),
                };
                assert!(
                    err.contains(&*path.to_string_lossy()) && err.contains("truncated"),
                    "gzip={gzip} cut={cut}: {err}"
                );
            }
        }
        let empty = dir.path().join("empty.tar");
        std::fs::write(&empty, b"").unwrap();
        assert!(read_all(&empty).is_err());
    }

    #[test]
    fn duplicates_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.tar");
        write_archive(
            &path,
            &[("a/image_00001.jpg", b"x"), ("b/image_00001.jpg", b"y")],
            false,
        )
        .unwrap();
        let err = read_all(&path).unwrap_err().to_string();
        assert!(
            err.contains("dup.tar") && err.contains("b/image_00001.jpg"),
            "{err}"
        );

        let missing = dir.path().join("nope.tgz");
        let err = ArchiveReader::open(&missing).err().unwrap().to_string();
        assert!(err.contains("nope.tgz"), "{err}");
    }
}
