//! Where the model runs: [`DeviceChoice`], as `--device` names it.

use strum::VariantNames;
use tch::Device;

/// Where the model computes: `auto` takes CUDA when libtorch sees a GPU.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    strum::EnumString,
    strum::VariantNames,
    strum::IntoStaticStr,
    strum::EnumIter,
    strum::EnumMessage,
)]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = DeviceError,
    parse_err_fn = unknown_device
)]
pub enum DeviceChoice {
    #[default]
    #[strum(message = "CUDA when available, else the CPU")]
    Auto,
    Cpu,
    Cuda,
}

/// The reply to an unusable `--device` (or another compute option, such as the trainer's
/// `--precision`).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown {what} {given:?}: expected one of {}", expected.join(", "))]
    Unknown {
        what: &'static str,
        given: String,
        expected: &'static [&'static str],
    },
    // The pinned torch 2.11 wheel is a CUDA 13 build: older drivers see no device.
    #[error(
        "--device cuda asked for, but libtorch sees no CUDA device: none is visible here (in a \
         container: no GPU reserved for it), or the NVIDIA driver is too old for libtorch's \
         CUDA 13 build (nvidia-smi must show CUDA 13 or later); --device cpu trains on the CPU"
    )]
    NoCuda,
}

fn unknown_device(given: &str) -> DeviceError {
    DeviceError::Unknown {
        what: "device",
        given: given.to_owned(),
        expected: DeviceChoice::VARIANTS,
    }
}

impl DeviceChoice {
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            Self::Auto => Ok(Device::cuda_if_available()),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Self::Cuda => Err(DeviceError::NoCuda),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices_and_rejects_others() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        let err = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("\"tpu\"") && err.contains("cpu"), "{err}");
    }
}
