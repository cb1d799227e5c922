//! The forward pass of a batch, through the trunk cache where the trunk is frozen.

use flowers_model::{flip_rows, to_model_input};
use tch::{Device, Kind, Tensor};

use super::TrainState;
use crate::batch::BatchView;
use crate::device::{upload_nhwc, with_precision};
use crate::TrainError;

impl TrainState {
    /// Logits of the batch (training mode and flips when `train`), under the run's precision.
    /// While the trunk is frozen and the batch names its images, trunk activations come from
    /// the cache, and those missing are computed (without gradients) and added to it.
    pub(super) fn logits(
        &mut self,
        batch: BatchView<'_>,
        train: bool,
    ) -> Result<Tensor, TrainError> {
        let (device, precision) = (self.opts.device, self.opts.precision);
        let flip = train && self.opts.flip;
        if let Some(names) = batch.names.filter(|n| n.len() != batch.labels.len()) {
            return Err(TrainError::BatchNames {
                names: names.len(),
                labels: batch.labels.len(),
            });
        }
        let names = match batch.names {
            Some(names) if self.model.trunk_is_frozen() && self.trunk_cache.is_enabled() => names,
            _ => {
                let pixels = upload_nhwc(batch.pixels, batch.shape, device);
                let x = to_model_input(&pixels, device, flip)?;
                return Ok(with_precision(precision, device, || {
                    self.model.forward_t(&x, train)
                }));
            }
        };
        let flips: Vec<bool> = if flip {
            Vec::<bool>::try_from(
                Tensor::rand([names.len() as i64], (Kind::Float, Device::Cpu)).lt(0.5),
            )?
        } else {
            vec![false; names.len()]
        };
        let mut rows: Vec<Option<Tensor>> = names
            .iter()
            .zip(&flips)
            .map(|(name, &f)| self.trunk_cache.get(name, f))
            .collect();
        let missing: Vec<i64> = (0..rows.len() as i64)
            .filter(|&i| rows[i as usize].is_none())
            .collect();
        // Only images missing from the cache need their pixels on the device.
        if !missing.is_empty() {
            let pixels = upload_nhwc(batch.pixels, batch.shape, device);
            let index = Tensor::from_slice(&missing).to_device(device);
            let x = to_model_input(&pixels.f_index_select(0, &index)?, device, false)?;
            let x = flip_rows(
                &x,
                &missing
                    .iter()
                    .map(|&i| flips[i as usize])
                    .collect::<Vec<_>>(),
            );
            let trunk =
                tch::no_grad(|| with_precision(precision, device, || self.model.trunk(&x, false)));
            for (j, &i) in missing.iter().enumerate() {
                let i = i as usize;
                // A copy owns its storage, so a cached image does not pin the whole batch.
                let activation = trunk.get(j as i64).copy();
                self.trunk_cache
                    .insert(&names[i], flips[i], activation.shallow_clone());
                rows[i] = Some(activation);
            }
        }
        let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
        let trunk = Tensor::f_stack(&rows, 0)?;
        Ok(with_precision(precision, device, || {
            self.model.forward_from_trunk(&trunk, train)
        }))
    }
}
