//! What workers exchange through the coordinator: the names of the synced tensors, their
//! current values, and averages loaded back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use flowers_model::{
    copy_into_variables, is_trunk_variable, tensor_file, InceptionV3, ModelConfig, Policy,
};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::TrainState;
use crate::TrainError;

impl TrainState {
    /// Names of the tensors workers exchange over a run whose phases train under `policies`:
    /// every policy's [`InceptionV3::sync_tensor_names`], so that the set stays the same when
    /// a phase changes what trains (frozen tensors are equal on every worker, so averaging them
    /// changes nothing). Sorted.
    pub fn sync_names(&self, policies: &[Policy]) -> Vec<String> {
        let mut names: BTreeSet<String> = self.model.sync_tensor_names().into_iter().collect();
        for &policy in policies.iter().filter(|&&p| p != self.policy()) {
            // Which tensors a policy trains is decided while building the model: build a
            // throwaway one on the CPU.
            let vs = VarStore::new(Device::Cpu);
            let config = ModelConfig {
                policy,
                ..self.model.config().clone()
            };
            names.extend(InceptionV3::new(&vs.root(), config).sync_tensor_names());
        }
        names.into_iter().collect()
    }

    /// The current values of the variables `names`, as safetensors bytes with `metadata`.
    pub fn tensors_bytes(
        &self,
        names: &[String],
        metadata: &HashMap<String, String>,
    ) -> Result<Vec<u8>, TrainError> {
        let vars = self.vs.variables();
        let tensors = names
            .iter()
            .map(|n| {
                vars.get(n)
                    .map(|t| (n.as_str(), t))
                    .ok_or_else(|| TrainError::NoVariable { name: n.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(tensor_file::to_bytes("parameters", tensors, metadata)?)
    }

    /// Overwrites variables with same-named `tensors` (e.g. an average of workers); every name
    /// must be a variable of the same shape. The optimizer state is kept.
    pub fn load_tensors(
        &mut self,
        what: &str,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<(), TrainError> {
        copy_into_variables(
            &self.vs,
            Path::new(what),
            tensors.iter().map(|(name, t)| (name.as_str(), t)),
        )?;
        if tensors.keys().any(|n| is_trunk_variable(n)) {
            self.trunk_cache.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;
    use crate::state::tests::opts;

    #[test]
    fn sync_names_cover_every_phase_and_tensors_round_trip() {
        tch::manual_seed(0);
        let mut a = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let head = a.sync_names(&[Policy::Head]);
        assert_eq!(head, ["fc.bias", "fc.weight"]);
        let both = a.sync_names(&[Policy::Head, Policy::Reference]);
        assert!(both.len() > head.len() && head.iter().all(|n| both.contains(n)));
        assert!(both.iter().any(|n| n.ends_with("bn.running_mean")));

        tch::manual_seed(1);
        let b = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let meta = HashMap::from([("variant".to_string(), "torchvision".to_string())]);
        let bytes = b.tensors_bytes(&both, &meta).unwrap();
        let file = tensor_file::from_bytes(Path::new("b"), &bytes).unwrap();
        assert_eq!(file.metadata, meta);
        assert_eq!(file.tensors.len(), both.len());
        a.load_tensors("b", &file.tensors).unwrap();
        let (va, vb) = (a.var_store().variables(), b.var_store().variables());
        assert!(both.iter().all(|n| va[n].equal(&vb[n])));
        // Still a leaf that trains.
        assert!(va["fc.weight"].requires_grad());

        let wrong = BTreeMap::from([(
            "fc.bias".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )]);
        let err = a.load_tensors("upload", &wrong).unwrap_err().to_string();
        assert!(err.contains("upload") && err.contains("fc.bias"), "{err}");
    }
}
