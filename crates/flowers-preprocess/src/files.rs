//! Loose JPEG files (not an archive) preprocessed as the loader does, e.g. for inference.

use std::path::PathBuf;

use crate::store::image_bytes;
use crate::PreprocessError;

/// Reads and preprocesses every image into one `uint8 [N, S, S, 3]` buffer; the first
/// unreadable or undecodable file ends it with an error naming the file.
pub fn preprocess_files(paths: &[PathBuf], img_size: u32) -> Result<Vec<u8>, PreprocessError> {
    let mut pixels = Vec::with_capacity(paths.len() * image_bytes(img_size));
    for path in paths {
        let bytes = std::fs::read(path).map_err(|source| PreprocessError::ReadImage {
            path: path.clone(),
            source,
        })?;
        let image = flowers_imaging::preprocess_jpeg(&bytes, img_size).map_err(|source| {
            PreprocessError::Undecodable {
                path: path.clone(),
                source,
            }
        })?;
        pixels.extend_from_slice(&image);
    }
    Ok(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(width: usize, height: usize) -> Vec<u8> {
        let rgb: Vec<u8> = (0..width * height * 3)
            .map(|i| ((i * 7) % 251) as u8)
            .collect();
        flowers_imaging::encode_rgb_jpeg(&rgb, width, height, 90).unwrap()
    }

    #[test]
    fn a_non_jpeg_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.jpg");
        let bad = dir.path().join("notes.txt");
        std::fs::write(&good, jpeg(80, 80)).unwrap();
        std::fs::write(&bad, b"just some text").unwrap();
        let err = preprocess_files(&[good, bad], 75).unwrap_err().to_string();
        assert!(err.contains("notes.txt") && err.contains("JPEG"), "{err}");
        let missing = dir.path().join("missing.jpg");
        let err = preprocess_files(&[missing], 75).unwrap_err().to_string();
        assert!(err.contains("missing.jpg"), "{err}");
    }
}
