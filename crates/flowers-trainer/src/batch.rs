//! A batch as the training thread takes it: borrowed ([`BatchView`]) or moved out of its
//! message ([`OwnedBatch`]).

use flowers_wire::Batch;

/// Borrowed view of one batch: pixels NHWC uint8, 0-based labels.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    pub pixels: &'a [u8],
    /// `[N, H, W, 3]`.
    pub shape: [i64; 4],
    pub labels: &'a [u32],
    /// The images' file names: with them, trunk activations are cached (see
    /// [`crate::trunk_cache::TrunkCache`]).
    pub names: Option<&'a [String]>,
}

/// A delivered batch's pixels and labels, moved out of the message so that the training
/// thread can own them.
pub struct OwnedBatch {
    pixels: Vec<u8>,
    labels: Vec<u32>,
    names: Vec<String>,
    shape: [i64; 4],
}

impl OwnedBatch {
    pub fn take(batch: &mut Batch) -> Self {
        let s = &batch.shape;
        Self {
            shape: [s[0], s[1], s[2], s[3]].map(i64::from),
            pixels: std::mem::take(&mut batch.pixels),
            labels: batch.labels.clone(),
            names: batch.file_names.clone(),
        }
    }

    pub fn view(&self) -> BatchView<'_> {
        BatchView {
            pixels: &self.pixels,
            shape: self.shape,
            labels: &self.labels,
            names: Some(&self.names),
        }
    }
}
