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
        return Err(ModelError::InvalidInput(format!(
            "model input must be uint8 [N, H, W, 3], got {:?} {size:?}",
            batch.kind()
        )));
    }
    let x = batch
        .to_device(device)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0;
    let x = if flip {
        let n = size[0];
        let mask = Tensor::rand([n, 1, 1, 1], (Kind::Float, device)).lt(0.5);
        x.flip([3]).where_self(&mask, &x)
    } else {
        x
    };
    Ok(if device.is_cuda() { x } else { x.contiguous() })
}
