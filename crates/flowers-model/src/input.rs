//! Turning loader batches into model input on the training device.

use tch::{Device, Kind, Tensor};

use crate::ModelError;

/// `uint8 [N, H, W, 3]` -> `float [N, 3, H, W]` in [-1, 1] (`x / 127.5 - 1`, the Inception/TF
/// preprocessing; torchvision's `transform_input=False` path expects the same range for the
/// TF-derived weights) on `device`.
///
/// The pixels move to the device as uint8 (4x less traffic) and are converted there. The NCHW
/// result is a permuted view of NHWC memory, i.e. channels-last, which cuDNN prefers; on the CPU
/// it is made contiguous. With `flip`, each sample is mirrored horizontally with probability 1/2
/// (torch's RNG, so `tch::manual_seed` makes it reproducible).
pub fn to_model_input(batch: &Tensor, device: Device, flip: bool) -> Result<Tensor, ModelError> {
    let size = batch.size();
    if batch.kind() != Kind::Uint8 || size.len() != 4 || size[3] != 3 {
        return Err(ModelError::InputLayout {
            kind: batch.kind(),
            shape: size,
        });
    }
    let x = batch
        .to_device(device)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0;
    let x = if flip {
        let mask = Tensor::rand([size[0], 1, 1, 1], (Kind::Float, device)).lt(0.5);
        mirror_where(&x, &mask)
    } else {
        x
    };
    Ok(if device.is_cuda() { x } else { x.contiguous() })
}

/// Mirrors the samples `i` of an NCHW batch where `flips[i]` (the same flip as
/// [`to_model_input`]'s, with the choice made by the caller).
pub fn flip_rows(x: &Tensor, flips: &[bool]) -> Tensor {
    let mask = Tensor::from_slice(flips)
        .to_device(x.device())
        .view([flips.len() as i64, 1, 1, 1]);
    mirror_where(x, &mask)
}

fn mirror_where(x: &Tensor, mask: &Tensor) -> Tensor {
    x.flip([3]).where_self(mask, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_to_minus_one_one_in_nchw() {
        let px = Tensor::from_slice(&[0u8, 255, 51, 102, 127, 204]).view([1, 1, 2, 3]);
        let x = to_model_input(&px, Device::Cpu, false).unwrap();
        assert_eq!(x.size(), [1, 3, 1, 2]);
        assert_eq!(x.kind(), Kind::Float);
        let want = Tensor::from_slice(&[0f32, 102., 255., 127., 51., 204.]).view([1, 3, 1, 2])
            / 127.5
            - 1.0;
        assert!(x.allclose(&want, 0.0, 1e-7, false));
        assert!(x.is_contiguous());
    }

    #[test]
    fn flips_some_samples_whole_and_keeps_the_others() {
        tch::manual_seed(3);
        let px =
            Tensor::randint(256, [64, 5, 7, 3], (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
        let plain = to_model_input(&px, Device::Cpu, false).unwrap();
        let x = to_model_input(&px, Device::Cpu, true).unwrap();
        let mut flipped = 0;
        for i in 0..64 {
            let (xi, pi) = (x.get(i), plain.get(i));
            if xi.equal(&pi.flip([2])) {
                flipped += 1;
            } else {
                assert!(xi.equal(&pi), "sample {i} is neither original nor mirrored");
            }
        }
        assert!((12..=52).contains(&flipped), "{flipped} of 64 flipped");
    }

    #[test]
    fn flip_rows_mirrors_exactly_the_chosen_samples() {
        let px =
            Tensor::randint(256, [3, 4, 5, 3], (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
        let plain = to_model_input(&px, Device::Cpu, false).unwrap();
        let x = flip_rows(&plain, &[true, false, true]);
        assert!(x.get(0).equal(&plain.get(0).flip([2])));
        assert!(x.get(1).equal(&plain.get(1)));
        assert!(x.get(2).equal(&plain.get(2).flip([2])));
    }

    #[test]
    fn rejects_wrong_layout() {
        let px = Tensor::zeros([2, 3, 8, 8], (Kind::Uint8, Device::Cpu));
        let err = to_model_input(&px, Device::Cpu, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[N, H, W, 3]"), "{err}");
        let px = Tensor::zeros([2, 8, 8, 3], (Kind::Float, Device::Cpu));
        assert!(to_model_input(&px, Device::Cpu, false).is_err());
    }
}
