//! JPEG decode, square centre crop and resize to RGB uint8.
//!
//! The pipeline is: read the JPEG header, decode with libjpeg-turbo's DCT scaling at the smallest
//! of the factors 1/8, 1/4, 1/2, 1 that keeps the short side at least `img_size` (so at 250 px a
//! 500 px image decodes at 1/2 and needs no resize), take the centred square and resize it to
//! `img_size` with `fast_image_resize`'s bilinear interpolation.
//!
//! Why only those four of libjpeg's M/8 factors: they have SIMD inverse DCTs, the others
//! (3/8, 5/8, ...) run plain C. On the flowers images (500 px short side) at 299 px, decoding at
//! 5/8 took 0.98 ms against 0.72 ms at full size, and the whole decode+resize used 11% less CPU
//! when decoding at full size and resizing 500 -> 299 instead of 313 -> 299.
//!
//! Why bilinear interpolation: it is what the reference pipeline does (`cv2.resize` with its
//! default `INTER_LINEAR`), so the model sees the same kind of pixels, and it used 7% less CPU
//! per image than `fast_image_resize`'s antialiasing bilinear convolution. The DCT scaling
//! leaves less than a 2x reduction to the resize, where a 2-tap filter aliases little.
//!
//! Greyscale JPEGs are expanded to RGB by libjpeg; CMYK/YCCK JPEGs are decoded as CMYK and
//! converted here (libjpeg cannot convert them to RGB).
//!
//! Main types: [`JpegPreprocessor`] (one per thread: decoder, resizer and buffers reused) and
//! [`ImageError`]. The loader and `flowersctl predict` both preprocess through it, so that
//! training and prediction see the same pixels; it must not depend on any other crate of the
//! workspace.

mod fast_decode;

use std::cell::RefCell;

use fast_decode::FastDecompressor;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use turbojpeg::{Colorspace, Decompressor, PixelFormat};

/// Why an image could not be preprocessed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a decodable JPEG: {0}")]
    Jpeg(#[from] turbojpeg::Error),
    #[error("not a decodable JPEG: {0}")]
    Decode(String),
    #[error("the JPEG decoder could not start")]
    DecoderStart,
    #[error("JPEG has a zero-sized dimension ({width}x{height})")]
    Empty { width: usize, height: usize },
    #[error("target size must be positive")]
    ZeroTarget,
    #[error("output buffer holds {got} bytes, {expected} needed")]
    OutputSize { expected: usize, got: usize },
    #[error("resize failed: {0}")]
    Resize(String),
}

/// A square region of an image: `side` pixels from (`left`, `top`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Square {
    pub left: usize,
    pub top: usize,
    pub side: usize,
}

/// The largest centred square of a `width` x `height` image (odd leftovers go to the right/bottom).
pub fn center_square(width: usize, height: usize) -> Square {
    let side = width.min(height);
    Square {
        left: (width - side) / 2,
        top: (height - side) / 2,
        side,
    }
}

/// The DCT scaling numerator M (decode at M/8) for an image whose short side is `short_side`:
/// the smallest M of 1, 2, 4, 8 (the SIMD-accelerated scales) that keeps the scaled short side
/// >= `target`; 8 when even full size is smaller.
pub fn dct_scale_numerator(short_side: usize, target: usize) -> usize {
    [1, 2, 4, 8]
        .into_iter()
        .find(|&m| scaled_dim(short_side, m) >= target)
        .unwrap_or(8)
}

/// libjpeg's size of a dimension decoded at `m`/8 (TJSCALED: rounds up).
fn scaled_dim(dim: usize, m: usize) -> usize {
    (dim * m).div_ceil(8)
}

/// Crops `square` out of a packed RGB image of `width` pixels per row and resizes it to
/// `size` x `size` into `out` (RGB HWC) by bilinear interpolation. A plain copy when the square
/// is already that size.
pub fn crop_resize_rgb(
    resizer: &mut Resizer,
    rgb: &[u8],
    width: usize,
    height: usize,
    square: Square,
    size: u32,
    out: &mut [u8],
) -> Result<(), ImageError> {
    let expected = size as usize * size as usize * 3;
    if out.len() != expected {
        return Err(ImageError::OutputSize {
            expected,
            got: out.len(),
        });
    }
    let resize_err = |e: &dyn std::fmt::Display| ImageError::Resize(e.to_string());
    let src = ImageRef::new(width as u32, height as u32, rgb, PixelType::U8x3)
        .map_err(|e| resize_err(&e))?;
    let mut dst =
        Image::from_slice_u8(size, size, out, PixelType::U8x3).map_err(|e| resize_err(&e))?;
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Interpolation(FilterType::Bilinear))
        .crop(
            square.left as f64,
            square.top as f64,
            square.side as f64,
            square.side as f64,
        );
    resizer
        .resize(&src, &mut dst, &options)
        .map_err(|e| resize_err(&e))
}

/// Reusable decoder, resizer and scratch buffers: one per worker thread avoids re-initialising
/// libjpeg and reallocating the decode buffer for every image.
pub struct JpegPreprocessor {
    decompressor: Decompressor,
    fast: FastDecompressor,
    resizer: Resizer,
    decoded: Vec<u8>,
    cmyk: Vec<u8>,
}

impl JpegPreprocessor {
    pub fn new() -> Result<Self, ImageError> {
        Ok(Self {
            decompressor: Decompressor::new()?,
            fast: FastDecompressor::new()?,
            resizer: Resizer::new(),
            decoded: Vec::new(),
            cmyk: Vec::new(),
        })
    }

    /// Decodes `jpeg`, centre-crops it square and resizes it to `img_size`, writing RGB HWC
    /// (`img_size * img_size * 3` bytes) into `out`.
    pub fn preprocess_into(
        &mut self,
        jpeg: &[u8],
        img_size: u32,
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        if img_size == 0 {
            return Err(ImageError::ZeroTarget);
        }
        let header = self.decompressor.read_header(jpeg)?;
        if header.width == 0 || header.height == 0 {
            return Err(ImageError::Empty {
                width: header.width,
                height: header.height,
            });
        }
        let m = dct_scale_numerator(header.width.min(header.height), img_size as usize);
        let (width, height) = (scaled_dim(header.width, m), scaled_dim(header.height, m));
        self.decoded.resize(width * height * 3, 0);
        match header.colorspace {
            Colorspace::CMYK | Colorspace::YCCK => {
                self.cmyk.resize(width * height * 4, 0);
                // TurboJPEG 2.x picks the DCT scaling from the requested output size.
                self.fast
                    .decompress(jpeg, &mut self.cmyk, width, height, PixelFormat::CMYK)?;
                cmyk_to_rgb(&self.cmyk, &mut self.decoded);
            }
            _ => self
                .fast
                .decompress(jpeg, &mut self.decoded, width, height, PixelFormat::RGB)?,
        }
        crop_resize_rgb(
            &mut self.resizer,
            &self.decoded,
            width,
            height,
            center_square(width, height),
            img_size,
            out,
        )
    }
}

/// Converts CMYK as stored by Adobe-style JPEGs (Photoshop, PIL, libjpeg-turbo all write the
/// inverted convention: 255 = no ink) to RGB: R = C*K/255, and so on.
fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (src, dst) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        let k = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * k + 127) / 255) as u8;
        }
    }
}

thread_local! {
    static PREPROCESSOR: RefCell<Option<JpegPreprocessor>> = const { RefCell::new(None) };
}

/// Decodes, centre-crops and resizes one JPEG to `img_size` x `img_size` RGB HWC uint8, using a
/// per-thread [`JpegPreprocessor`].
pub fn preprocess_jpeg(jpeg: &[u8], img_size: u32) -> Result<Vec<u8>, ImageError> {
    let mut out = vec![0u8; img_size as usize * img_size as usize * 3];
    PREPROCESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let preprocessor = match slot.as_mut() {
            Some(p) => p,
            None => slot.insert(JpegPreprocessor::new()?),
        };
        preprocessor.preprocess_into(jpeg, img_size, &mut out)
    })?;
    Ok(out)
}

/// Encodes packed RGB (`width * height * 3` bytes) as a baseline 4:2:0 JPEG. The pipeline only
/// decodes; this exists so tests across the workspace can make real JPEGs.
pub fn encode_rgb_jpeg(
    rgb: &[u8],
    width: usize,
    height: usize,
    quality: i32,
) -> Result<Vec<u8>, ImageError> {
    let image = turbojpeg::Image {
        pixels: rgb,
        width,
        pitch: width * 3,
        height,
        format: PixelFormat::RGB,
    };
    Ok(turbojpeg::compress(image, quality, turbojpeg::Subsamp::Sub2x2)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RGB image whose left half is red and right half blue, with a green top-left block.
    fn halves(width: usize, height: usize) -> Vec<u8> {
        let mut rgb = vec![0u8; width * height * 3];
        for y in 0..height {
            for x in 0..width {
                let p = &mut rgb[(y * width + x) * 3..][..3];
                p.copy_from_slice(if x < width / 2 {
                    &[220, 20, 20]
                } else {
                    &[20, 20, 220]
                });
            }
        }
        rgb
    }

    fn pixel(img: &[u8], size: usize, x: usize, y: usize) -> [u8; 3] {
        let p = &img[(y * size + x) * 3..][..3];
        [p[0], p[1], p[2]]
    }

    fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
        a.iter()
            .zip(b.iter())
            .all(|(&x, &y)| (x as i32 - y as i32).abs() <= tol)
    }

    #[test]
    fn center_square_of_landscape_portrait_and_square() {
        assert_eq!(
            center_square(500, 300),
            Square {
                left: 100,
                top: 0,
                side: 300
            }
        );
        assert_eq!(
            center_square(300, 501),
            Square {
                left: 0,
                top: 100,
                side: 300
            }
        );
        assert_eq!(
            center_square(7, 7),
            Square {
                left: 0,
                top: 0,
                side: 7
            }
        );
    }

    #[test]
    fn dct_scale_is_the_smallest_that_keeps_the_target() {
        // 500 px short side at 250: exactly 1/2, no resize needed afterwards.
        assert_eq!(dct_scale_numerator(500, 250), 4);
        // 500 at 299: 4/8 gives 250 < 299; the slow 5/8 is passed over for full size.
        assert_eq!(dct_scale_numerator(500, 299), 8);
        assert_eq!(dct_scale_numerator(1000, 299), 4);
        assert_eq!(dct_scale_numerator(2400, 299), 1);
        assert_eq!(dct_scale_numerator(2400, 301), 2);
        // Smaller than the target: decode at full size and upscale.
        assert_eq!(dct_scale_numerator(200, 299), 8);
    }

    #[test]
    fn crop_resize_keeps_the_centre_and_copies_when_same_size() {
        let (w, h) = (40, 20);
        let mut rgb = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                rgb[(y * w + x) * 3] = x as u8;
                rgb[(y * w + x) * 3 + 1] = y as u8;
            }
        }
        let mut resizer = Resizer::new();
        let mut out = vec![0u8; 20 * 20 * 3];
        crop_resize_rgb(&mut resizer, &rgb, w, h, center_square(w, h), 20, &mut out).unwrap();
        // Same size: an exact copy of columns 10..30.
        assert_eq!(pixel(&out, 20, 0, 0), [10, 0, 0]);
        assert_eq!(pixel(&out, 20, 19, 19), [29, 19, 0]);

        let mut small = vec![0u8; 10 * 10 * 3];
        crop_resize_rgb(
            &mut resizer,
            &rgb,
            w,
            h,
            center_square(w, h),
            10,
            &mut small,
        )
        .unwrap();
        // Halving a linear ramp: output column c averages source columns 10+2c and 11+2c.
        let [r, g, _] = pixel(&small, 10, 3, 5);
        assert!((16..=17).contains(&r), "r = {r}");
        assert!((10..=11).contains(&g), "g = {g}");

        let mut wrong = vec![0u8; 5];
        assert!(matches!(
            crop_resize_rgb(
                &mut resizer,
                &rgb,
                w,
                h,
                center_square(w, h),
                10,
                &mut wrong
            ),
            Err(ImageError::OutputSize { expected: 300, .. })
        ));
    }

    #[test]
    fn preprocess_crops_a_landscape_jpeg_to_the_centre() {
        // 400x200: the centre square spans x 100..300, half red, half blue.
        let jpeg = encode_rgb_jpeg(&halves(400, 200), 400, 200, 95).unwrap();
        let out = preprocess_jpeg(&jpeg, 64).unwrap();
        assert_eq!(out.len(), 64 * 64 * 3);
        assert!(close(pixel(&out, 64, 8, 32), [220, 20, 20], 25));
        assert!(close(pixel(&out, 64, 56, 32), [20, 20, 220], 25));
    }

    #[test]
    fn preprocess_upscales_small_images() {
        let jpeg = encode_rgb_jpeg(&halves(32, 48), 32, 48, 95).unwrap();
        let out = preprocess_jpeg(&jpeg, 100).unwrap();
        assert_eq!(out.len(), 100 * 100 * 3);
        assert!(close(pixel(&out, 100, 10, 50), [220, 20, 20], 25));
        assert!(close(pixel(&out, 100, 90, 50), [20, 20, 220], 25));
    }

    #[test]
    fn greyscale_jpeg_becomes_rgb() {
        let (w, h) = (64usize, 48usize);
        let grey: Vec<u8> = (0..w * h)
            .map(|i| if i % w < w / 2 { 40 } else { 200 })
            .collect();
        let image = turbojpeg::Image {
            pixels: &grey[..],
            width: w,
            pitch: w,
            height: h,
            format: PixelFormat::GRAY,
        };
        let jpeg = turbojpeg::compress(image, 95, turbojpeg::Subsamp::Gray).unwrap();
        assert_eq!(
            turbojpeg::read_header(&jpeg).unwrap().colorspace,
            Colorspace::Gray
        );
        let out = preprocess_jpeg(&jpeg, 32).unwrap();
        assert!(close(pixel(&out, 32, 4, 16), [40, 40, 40], 8));
        assert!(close(pixel(&out, 32, 28, 16), [200, 200, 200], 8));
    }

    #[test]
    fn cmyk_jpeg_becomes_rgb() {
        // Made by PIL: Image.new('CMYK', (48, 40), (0, 255, 255, 0)), i.e. pure red ink-wise.
        let jpeg = include_bytes!("../tests/fixtures/cmyk_red.jpg");
        assert!(matches!(
            turbojpeg::read_header(jpeg).unwrap().colorspace,
            Colorspace::CMYK | Colorspace::YCCK
        ));
        let out = preprocess_jpeg(jpeg, 16).unwrap();
        assert!(
            close(pixel(&out, 16, 8, 8), [255, 0, 0], 12),
            "{:?}",
            pixel(&out, 16, 8, 8)
        );
    }

    #[test]
    fn corrupt_and_truncated_jpegs_are_errors() {
        let err = preprocess_jpeg(b"definitely not a jpeg", 32).unwrap_err();
        assert!(err.to_string().contains("not a decodable JPEG"), "{err}");

        let jpeg = encode_rgb_jpeg(&halves(256, 256), 256, 256, 90).unwrap();
        let truncated = &jpeg[..jpeg.len() / 2];
        assert!(preprocess_jpeg(truncated, 32).is_err());
        assert!(matches!(
            preprocess_jpeg(&jpeg, 0),
            Err(ImageError::ZeroTarget)
        ));
    }
}
