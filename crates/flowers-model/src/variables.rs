//! Overwriting a model's variables with named tensors: pretrained weights, a checkpoint, or an
//! average of workers.

use std::path::Path;

use tch::nn::VarStore;
use tch::Tensor;

use crate::ModelError;

/// Copies each of `tensors` into the variable of `vs` with the same name; every name must be a
/// variable of the same shape, else the error names `source` and the tensor. The copy bypasses
/// autograd, so the variables stay leaves that train.
pub fn copy_into_variables<'a>(
    vs: &VarStore,
    source: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<(), ModelError> {
    let vars = vs.variables();
    for (name, src) in tensors {
        let mut var = vars
            .get(name)
            .ok_or_else(|| ModelError::NotAVariable {
                path: source.to_path_buf(),
                name: name.to_owned(),
            })?
            .shallow_clone();
        if src.size() != var.size() {
            return Err(ModelError::shape_mismatch(
                source,
                name,
                &src.size(),
                &var.size(),
            ));
        }
        tch::no_grad(|| var.f_copy_(src))?;
    }
    Ok(())
}
