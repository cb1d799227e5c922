//! [`PixelStore`]: preprocessed images as fixed-size records in an unlinked file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::PreprocessError;

/// Preprocessed images as fixed-size RGB HWC records in a file, read back by image number.
///
/// The file is unlinked as soon as it is created, so it disappears with the store (or the
/// process) and never outlives a crash.
#[derive(Debug)]
pub struct PixelStore {
    file: File,
    path: PathBuf,
    img_size: u32,
    image_bytes: usize,
    slots: HashMap<u32, u64>,
}

impl PixelStore {
    pub(crate) fn create(cache_dir: &Path, img_size: u32) -> Result<Self, PreprocessError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = cache_dir.join(format!(
            "flowers-pixels-{}-{}-{img_size}.bin",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let store_err = |source| PreprocessError::Store {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(cache_dir).map_err(store_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(store_err)?;
        std::fs::remove_file(&path).map_err(store_err)?;
        Ok(Self {
            file,
            path,
            img_size,
            image_bytes: image_bytes(img_size),
            slots: HashMap::new(),
        })
    }

    pub(crate) fn write(&self, slot: u64, pixels: &[u8]) -> Result<(), PreprocessError> {
        self.file
            .write_all_at(pixels, slot * self.image_bytes as u64)
            .map_err(|source| PreprocessError::Store {
                path: self.path.clone(),
                source,
            })
    }

    /// Records which slot holds which image number, once every image is written.
    pub(crate) fn index(&mut self, slots: impl IntoIterator<Item = (u32, u64)>) {
        self.slots = slots.into_iter().collect();
    }

    pub fn img_size(&self) -> u32 {
        self.img_size
    }

    /// Bytes of one image: `img_size * img_size * 3`.
    pub fn image_bytes(&self) -> usize {
        self.image_bytes
    }

    /// How many images the store holds.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains(&self, number: u32) -> bool {
        self.slots.contains_key(&number)
    }

    /// Copies image `number` (RGB HWC) into `out`, which must be [`Self::image_bytes`] long.
    pub fn copy_into(&self, number: u32, out: &mut [u8]) -> Result<(), PreprocessError> {
        if out.len() != self.image_bytes {
            return Err(PreprocessError::BufferSize {
                expected: self.image_bytes,
                got: out.len(),
            });
        }
        let slot = *self
            .slots
            .get(&number)
            .ok_or(PreprocessError::NotStored { number })?;
        self.file
            .read_exact_at(out, slot * self.image_bytes as u64)
            .map_err(|source| PreprocessError::Store {
                path: self.path.clone(),
                source,
            })
    }
}

/// Bytes of one `img_size` x `img_size` RGB image.
pub(crate) fn image_bytes(img_size: u32) -> usize {
    img_size as usize * img_size as usize * 3
}
