//! `tjDecompress2` with libjpeg-turbo's fast paths, which the `turbojpeg` crate's
//! `Decompressor` does not expose (it always passes no flags):
//! - `TJFLAG_FASTDCT`: the fast integer inverse DCT (its SIMD version) instead of the
//!   accurate one;
//! - `TJFLAG_FASTUPSAMPLE`: merged chroma upsampling and colour conversion instead of
//!   "fancy" (triangle-filtered) upsampling.
//!
//! Both trade a little fidelity (differences of a few grey levels) for decoding speed; the
//! image is resized and fed to a network afterwards, where they are invisible.

use turbojpeg::PixelFormat;
use turbojpeg_sys as raw;

use crate::ImageError;

pub(crate) struct FastDecompressor {
    handle: raw::tjhandle,
}

// SAFETY: the handle is owned exclusively by this value and libjpeg-turbo keeps no thread
// affinity.
unsafe impl Send for FastDecompressor {}

impl FastDecompressor {
    pub(crate) fn new() -> Result<Self, ImageError> {
        // SAFETY: plain constructor; a null handle is checked below.
        let handle = unsafe { raw::tjInitDecompress() };
        if handle.is_null() {
            return Err(ImageError::DecoderStart);
        }
        Ok(Self { handle })
    }

    /// Decodes `jpeg` into `out` (`height * pitch` bytes) at `width` x `height`, which picks
    /// libjpeg's DCT scaling factor.
    pub(crate) fn decompress(
        &mut self,
        jpeg: &[u8],
        out: &mut [u8],
        width: usize,
        height: usize,
        format: PixelFormat,
    ) -> Result<(), ImageError> {
        let pitch = width * format.size();
        assert!(out.len() >= pitch * height, "output buffer too small");
        let dim =
            |v: usize| i32::try_from(v).map_err(|_| ImageError::Decode("image too large".into()));
        let flags = (raw::TJFLAG_FASTDCT | raw::TJFLAG_FASTUPSAMPLE) as i32;
        // SAFETY: `jpeg` and `out` are valid for the lengths passed; `out` holds
        // `pitch * height` bytes (asserted above); the handle is live.
        let status = unsafe {
            raw::tjDecompress2(
                self.handle,
                jpeg.as_ptr(),
                jpeg.len() as _,
                out.as_mut_ptr(),
                dim(width)?,
                dim(pitch)?,
                dim(height)?,
                format as i32,
                flags,
            )
        };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the handle is live; the message is a NUL-terminated string it owns.
        let message = unsafe { std::ffi::CStr::from_ptr(raw::tjGetErrorStr2(self.handle)) };
        Err(ImageError::Decode(message.to_string_lossy().into_owned()))
    }
}

impl Drop for FastDecompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once.
        unsafe {
            raw::tjDestroy(self.handle);
        }
    }
}
