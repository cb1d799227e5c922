//! The trainer's compute: the GPU's name, numeric precision and getting a uint8 NHWC batch onto
//! the device. Which device is [`flowers_model::DeviceChoice`]'s.

use flowers_model::DeviceError;
use strum::VariantNames;
use tch::{Device, Kind, Tensor};

/// The GPU's name for the coordinator's worker list (`None` on the CPU or without
/// `nvidia-smi`). libtorch has no call for it; `nvidia-smi` ignores CUDA_VISIBLE_DEVICES, so
/// the device is named by that variable's entry (an index or UUID) when it is set.
pub fn gpu_name(device: Device) -> Option<String> {
    let Device::Cuda(index) = device else {
        return None;
    };
    let id = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').nth(index).map(|s| s.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| index.to_string());
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", &id])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// Arithmetic of the forward pass. `Bf16` is CUDA autocast to bfloat16 (weights, gradients and
/// optimizer state stay fp32); on the CPU it falls back to fp32, since CPU bf16 convolutions are
/// slower than fp32 ones.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::Display, strum::VariantNames,
)]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = DeviceError,
    parse_err_fn = unknown_precision
)]
pub enum Precision {
    Fp32,
    Bf16,
}

fn unknown_precision(given: &str) -> DeviceError {
    DeviceError::Unknown {
        what: "precision",
        given: given.to_owned(),
        expected: Precision::VARIANTS,
    }
}

impl Precision {
    /// The precision the device actually runs: bf16 only on CUDA.
    pub fn effective(self, device: Device) -> Precision {
        if device.is_cuda() {
            self
        } else {
            Precision::Fp32
        }
    }
}

// tch's `autocast` switches CUDA autocast on but offers no way to choose its dtype, whose default
// is fp16. libtorch exports the setter as a C++ function taking two `int8_t`-backed enums by value,
// which the Itanium ABI passes exactly like C `int8_t` arguments.
extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
}

/// `c10::DeviceType::CUDA`.
const C10_CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const C10_BFLOAT16: i8 = 15;

/// Runs `f` (forward pass and loss) under the precision: bf16 autocast on CUDA, plain otherwise.
pub fn with_precision<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    match precision.effective(device) {
        Precision::Fp32 => f(),
        Precision::Bf16 => {
            // The autocast dtype is thread-local in libtorch: set it on the thread that computes.
            // SAFETY: plain value arguments; the function only stores them.
            unsafe { at_set_autocast_dtype(C10_CUDA, C10_BFLOAT16) };
            tch::autocast(true, f)
        }
    }
}

/// Whether CUDA autocast would run in bf16 on this thread (for tests and logs).
pub fn cuda_autocast_is_bf16() -> bool {
    // SAFETY: plain value argument, returns the stored dtype.
    unsafe { at_get_autocast_dtype(C10_CUDA) == C10_BFLOAT16 }
}

/// Puts a uint8 NHWC batch on `device` unchanged (conversion to float happens there).
/// On CUDA the bytes go through pinned host memory with a non-blocking copy, so the transfer
/// overlaps whatever the GPU is still doing; libtorch's caching host allocator keeps the pinned
/// block alive until the copy has finished.
pub fn upload_nhwc(pixels: &[u8], shape: [i64; 4], device: Device) -> Tensor {
    let numel: i64 = shape.iter().product();
    assert_eq!(
        numel as usize,
        pixels.len(),
        "pixel buffer does not match shape {shape:?}"
    );
    if !device.is_cuda() {
        return Tensor::from_data_size(pixels, &shape, Kind::Uint8);
    }
    let pinned = Tensor::empty(shape, (Kind::Uint8, Device::Cpu)).pin_memory(device);
    // SAFETY: `pinned` is a fresh contiguous uint8 tensor of exactly `pixels.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(pixels.as_ptr(), pinned.data_ptr() as *mut u8, pixels.len());
    }
    pinned.to_device_(device, Kind::Uint8, true, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_precisions_and_rejects_others() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert!("fp16".parse::<Precision>().is_err());
    }

    #[test]
    fn bf16_falls_back_to_fp32_on_cpu() {
        assert_eq!(Precision::Bf16.effective(Device::Cpu), Precision::Fp32);
        assert_eq!(Precision::Bf16.effective(Device::Cuda(0)), Precision::Bf16);
    }

    #[test]
    fn autocast_dtype_setter_links_and_takes_effect() {
        // Runs on its own test thread, and the dtype is thread-local, so other tests are unaffected.
        assert!(!cuda_autocast_is_bf16());
        // SAFETY: plain value arguments; the function only stores them.
        unsafe { at_set_autocast_dtype(C10_CUDA, C10_BFLOAT16) };
        assert!(cuda_autocast_is_bf16());
    }

    #[test]
    fn upload_keeps_bytes_and_shape() {
        let pixels: Vec<u8> = (0..2 * 3 * 4 * 3).map(|i| i as u8).collect();
        let t = upload_nhwc(&pixels, [2, 3, 4, 3], Device::Cpu);
        assert_eq!(t.size(), vec![2, 3, 4, 3]);
        assert_eq!(t.kind(), Kind::Uint8);
        assert_eq!(Vec::<u8>::try_from(t.flatten(0, -1)).unwrap(), pixels);
    }
}
