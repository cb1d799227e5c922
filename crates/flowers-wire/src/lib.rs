//! The Batch wire format: building, checksums, size limits and verification.
//!
//! A batch travels as one protobuf `flowers.v1.Batch` message per AMQP message:
//! uint8 pixels in NHWC order (`shape = [N, H, W, 3]`), 0-based labels and the
//! CRC-32C of the pixel bytes.
//!
//! * [`build_batch`] assembles a [`Batch`] from [`BatchHeader`] and the images,
//!   computing the shape and checksum.
//! * [`encode_batch`] verifies a batch and serialises it, refusing it with
//!   [`WireError::TooLarge`] when it would exceed the message size limit (so the
//!   broker never sees it).
//! * [`decode_and_verify`] is what consumers call on every payload; it checks
//!   checksum, dtype, shape, label and file name counts, and label range.
//! * [`Dims`] gives a verified batch's dimensions.
//!
//! Pure functions on bytes and messages: it depends on `flowers-proto` for the types and on
//! nothing that does I/O (no broker, no data set, no image codec), so that both ends of the
//! queue agree on one definition of a valid batch.

pub use flowers_proto::v1::{Batch, DType, Split};
use prost::Message;

/// Colour channels per pixel (RGB).
pub const CHANNELS: u32 = 3;

/// Default largest encoded message, 16 MiB: RabbitMQ 4.x refuses larger
/// messages by default (3.x allows 128 MiB), and a 32 x 299 x 299 x 3 batch
/// (8.6 MB) fits with room to spare.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why a batch could not be built, encoded or accepted.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a flowers.v1.Batch protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{batch}: {bytes} bytes encoded exceeds the {limit}-byte message size limit; use a smaller batch size or image size, or raise the limit (the broker must allow it too)")]
    TooLarge {
        batch: String,
        bytes: usize,
        limit: usize,
    },
    #[error("{batch}: pixel checksum mismatch: message says crc32c {expected:#010x}, pixels have {actual:#010x}")]
    Checksum {
        batch: String,
        expected: u32,
        actual: u32,
    },
    #[error("{batch}: dtype {dtype} is not DTYPE_UINT8")]
    DType { batch: String, dtype: i32 },
    #[error("{batch}: split {split} is neither train nor validation")]
    Split { batch: String, split: i32 },
    #[error("{batch}: bad shape: {reason}")]
    Shape { batch: String, reason: String },
    #[error("{batch}: image {position} has label {label}, not below num_classes {num_classes}")]
    Label {
        batch: String,
        position: usize,
        label: u32,
        num_classes: u32,
    },
}

/// Everything in a batch but the images: where it belongs in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    pub run_id: String,
    pub epoch: u32,
    pub split: Split,
    pub batch_index: u32,
    /// Number of batches of this split in this epoch.
    pub batches_in_epoch: u32,
    pub num_classes: u32,
    /// Validation batches: which evaluation of the epoch (0: its end; p: the interim one).
    pub eval_part: u32,
}

/// Dimensions of a verified batch: `n` images of `height` x `width` x `channels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl Dims {
    /// Bytes of one image.
    pub fn image_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The dimensions in `shape`, checked against the rest of `batch`.
    pub fn of(batch: &Batch) -> Result<Dims, WireError> {
        let bad = |reason: String| WireError::Shape {
            batch: describe(batch),
            reason,
        };
        let &[n, h, w, c] = batch.shape.as_slice() else {
            return Err(bad(format!(
                "shape {:?} has {} dimensions, expected [N, H, W, 3]",
                batch.shape,
                batch.shape.len()
            )));
        };
        if c != CHANNELS {
            return Err(bad(format!("{c} channels, expected {CHANNELS}")));
        }
        if n == 0 || h == 0 || w == 0 {
            return Err(bad(format!("empty shape {:?}", batch.shape)));
        }
        let dims = Dims {
            n: n as usize,
            height: h as usize,
            width: w as usize,
            channels: c as usize,
        };
        let expected = dims
            .n
            .checked_mul(dims.image_bytes())
            .ok_or_else(|| bad(format!("shape {:?} overflows", batch.shape)))?;
        if batch.pixels.len() != expected {
            return Err(bad(format!(
                "{} pixel bytes, shape {:?} needs {expected}",
                batch.pixels.len(),
                batch.shape
            )));
        }
        if batch.labels.len() != dims.n {
            return Err(bad(format!(
                "{} labels for {} images",
                batch.labels.len(),
                dims.n
            )));
        }
        if batch.file_names.len() != dims.n {
            return Err(bad(format!(
                "{} file names for {} images",
                batch.file_names.len(),
                dims.n
            )));
        }
        Ok(dims)
    }
}

/// A short name for a batch in error messages, e.g. `batch 3/10 of run r1 epoch 0 train`.
pub fn describe(batch: &Batch) -> String {
    let split = match Split::try_from(batch.split) {
        Ok(Split::Train) => "train".to_string(),
        Ok(Split::Validation) if batch.eval_part > 0 => format!("val part {}", batch.eval_part),
        Ok(Split::Validation) => "val".to_string(),
        _ => format!("split {}", batch.split),
    };
    format!(
        "batch {}/{} of run {:?} epoch {} {split}",
        batch.batch_index, batch.batches_in_epoch, batch.run_id, batch.epoch
    )
}

/// Builds a batch of `labels.len()` images of `height` x `width` RGB, whose
/// pixels lie back to back in `pixels` (NHWC), and checks it.
pub fn build_batch(
    header: &BatchHeader,
    height: u32,
    width: u32,
    file_names: Vec<String>,
    labels: Vec<u32>,
    pixels: Vec<u8>,
) -> Result<Batch, WireError> {
    let n = u32::try_from(labels.len()).unwrap_or(u32::MAX);
    let batch = Batch {
        run_id: header.run_id.clone(),
        epoch: header.epoch,
        split: header.split as i32,
        batch_index: header.batch_index,
        batches_in_epoch: header.batches_in_epoch,
        file_names,
        labels,
        shape: vec![n, height, width, CHANNELS],
        dtype: DType::DtypeUint8 as i32,
        pixels_crc32c: crc32c::crc32c(&pixels),
        pixels,
        num_classes: header.num_classes,
        eval_part: header.eval_part,
    };
    verify(&batch)?;
    Ok(batch)
}

/// Checks everything a consumer relies on; returns the batch's dimensions.
pub fn verify(batch: &Batch) -> Result<Dims, WireError> {
    if batch.dtype != DType::DtypeUint8 as i32 {
        return Err(WireError::DType {
            batch: describe(batch),
            dtype: batch.dtype,
        });
    }
    if !matches!(
        Split::try_from(batch.split),
        Ok(Split::Train | Split::Validation)
    ) {
        return Err(WireError::Split {
            batch: describe(batch),
            split: batch.split,
        });
    }
    let dims = Dims::of(batch)?;
    if let Some((position, &label)) = batch
        .labels
        .iter()
        .enumerate()
        .find(|(_, &label)| label >= batch.num_classes)
    {
        return Err(WireError::Label {
            batch: describe(batch),
            position,
            label,
            num_classes: batch.num_classes,
        });
    }
    let actual = crc32c::crc32c(&batch.pixels);
    if actual != batch.pixels_crc32c {
        return Err(WireError::Checksum {
            batch: describe(batch),
            expected: batch.pixels_crc32c,
            actual,
        });
    }
    Ok(dims)
}

/// Verifies and serialises `batch`; refuses it if the encoding would be
/// larger than `max_message_bytes`.
pub fn encode_batch(batch: &Batch, max_message_bytes: usize) -> Result<Vec<u8>, WireError> {
    verify(batch)?;
    let bytes = batch.encoded_len();
    if bytes > max_message_bytes {
        return Err(WireError::TooLarge {
            batch: describe(batch),
            bytes,
            limit: max_message_bytes,
        });
    }
    Ok(batch.encode_to_vec())
}

/// Decodes a message payload and verifies it (see [`verify`]).
pub fn decode_and_verify(bytes: &[u8]) -> Result<Batch, WireError> {
    let batch = Batch::decode(bytes)?;
    verify(&batch)?;
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BatchHeader {
        BatchHeader {
            run_id: "run-1".into(),
            epoch: 2,
            split: Split::Train,
            batch_index: 1,
            batches_in_epoch: 4,
            num_classes: 102,
            eval_part: 0,
        }
    }

    /// Two 3x2 images with distinct pixel values.
    fn sample() -> Batch {
        let pixels: Vec<u8> = (0..2 * 3 * 2 * 3).map(|i| (i * 7 % 256) as u8).collect();
        build_batch(
            &header(),
            3,
            2,
            vec!["jpg/image_00001.jpg".into(), "jpg/image_00002.jpg".into()],
            vec![0, 101],
            pixels,
        )
        .unwrap()
    }

    #[test]
    fn round_trip_keeps_everything() {
        let batch = sample();
        assert_eq!(batch.shape, vec![2, 3, 2, 3]);
        let bytes = encode_batch(&batch, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        let back = decode_and_verify(&bytes).unwrap();
        assert_eq!(back, batch);
        let dims = verify(&back).unwrap();
        assert_eq!(
            (dims.n, dims.height, dims.width, dims.image_bytes()),
            (2, 3, 2, 18)
        );
    }

    #[test]
    fn flipped_pixel_fails_checksum() {
        let mut batch = sample();
        batch.pixels[5] ^= 1;
        let bytes = batch.encode_to_vec();
        let err = decode_and_verify(&bytes).unwrap_err();
        assert!(matches!(err, WireError::Checksum { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("batch 1/4 of run \"run-1\" epoch 2 train"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = decode_and_verify(b"\xff\xff\xff\xff not protobuf").unwrap_err();
        assert!(matches!(err, WireError::Decode(_)), "{err}");
    }

    #[test]
    fn inconsistent_shapes_are_refused() {
        type Mutation = Box<dyn Fn(&mut Batch)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("3 dimensions", Box::new(|b| b.shape.truncate(3))),
            ("4 channels", Box::new(|b| b.shape[3] = 4)),
            ("needs 54", Box::new(|b| b.shape[0] = 3)),
            ("1 labels for 2", Box::new(|b| b.labels.truncate(1))),
            (
                "3 file names for 2",
                Box::new(|b| b.file_names.push("x".into())),
            ),
            ("empty shape", Box::new(|b| b.shape[1] = 0)),
        ];
        for (needle, mutate) in cases {
            let mut batch = sample();
            mutate(&mut batch);
            let err = decode_and_verify(&batch.encode_to_vec()).unwrap_err();
            assert!(matches!(err, WireError::Shape { .. }), "{needle}: {err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn label_out_of_range_is_refused() {
        let mut batch = sample();
        batch.labels[1] = 102;
        let err = decode_and_verify(&batch.encode_to_vec()).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Label {
                    position: 1,
                    label: 102,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn wrong_dtype_and_split_are_refused() {
        let mut batch = sample();
        batch.dtype = DType::DtypeUnspecified as i32;
        let err = decode_and_verify(&batch.encode_to_vec()).unwrap_err();
        assert!(matches!(err, WireError::DType { dtype: 0, .. }), "{err}");

        let mut batch = sample();
        batch.split = Split::Unspecified as i32;
        let err = decode_and_verify(&batch.encode_to_vec()).unwrap_err();
        assert!(matches!(err, WireError::Split { split: 0, .. }), "{err}");
    }

    #[test]
    fn build_refuses_pixels_that_do_not_fit_the_shape() {
        let err = build_batch(&header(), 3, 2, vec!["a".into()], vec![0], vec![0; 17]).unwrap_err();
        assert!(err.to_string().contains("17 pixel bytes"), "{err}");
    }

    #[test]
    fn oversized_batch_is_refused_before_encoding() {
        let batch = sample();
        let needed = batch.encoded_len();
        assert!(encode_batch(&batch, needed).is_ok());
        let err = encode_batch(&batch, needed - 1).unwrap_err();
        match &err {
            WireError::TooLarge { bytes, limit, .. } => {
                assert_eq!((*bytes, *limit), (needed, needed - 1));
            }
            other => panic!("expected TooLarge, got {other}"),
        }
        assert!(err.to_string().contains("message size limit"), "{err}");
    }

    #[test]
    fn default_limit_fits_a_full_inception_batch() {
        let pixels = vec![0u8; 32 * 299 * 299 * 3];
        let names = (0..32).map(|i| format!("jpg/image_{i:05}.jpg")).collect();
        let batch = build_batch(&header(), 299, 299, names, vec![7; 32], pixels).unwrap();
        assert!(encode_batch(&batch, DEFAULT_MAX_MESSAGE_BYTES).is_ok());
    }
}
