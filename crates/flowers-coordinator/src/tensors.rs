//! Safetensors parsing, schema checks and the sample-weighted average of uploads
//! ([`TensorSpec`], [`schema_of`], [`check_schema`], [`weighted_average`]).
//!
//! Tensors reach the coordinator as safetensors bytes, so it needs no tensor
//! library (and must not depend on one): it reads the little-endian payloads,
//! averages in f64 and writes the result back in each tensor's own dtype.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Name, dtype and shape of one tensor: what every upload of a run must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

fn parse(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| CoordinatorError::Tensor(format!("not a valid safetensors buffer: {e}")))
}

/// Whether the coordinator can average this dtype. Integer tensors (BatchNorm's
/// `num_batches_tracked`) are averaged and rounded.
fn supported(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::I64 | Dtype::I32
    )
}

/// The schema of a safetensors buffer, sorted by tensor name.
pub fn schema_of(bytes: &[u8]) -> Result<Vec<TensorSpec>> {
    let tensors = parse(bytes)?;
    let mut specs = Vec::new();
    for (name, view) in tensors.iter() {
        if !supported(view.dtype()) {
            return Err(CoordinatorError::Tensor(format!(
                "tensor {name:?} has dtype {}, expected one of F64, F32, F16, BF16, I64, I32",
                view.dtype()
            )));
        }
        specs.push(TensorSpec {
            name: name.to_owned(),
            dtype: view.dtype().to_string(),
            shape: view.shape().to_vec(),
        });
    }
    if specs.is_empty() {
        return Err(CoordinatorError::Tensor(
            "the upload holds no tensors".into(),
        ));
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

/// Checks that `got` has exactly the tensors of `expected`, with the same dtypes and shapes.
pub fn check_schema(expected: &[TensorSpec], got: &[TensorSpec]) -> Result<()> {
    let want: HashMap<&str, &TensorSpec> = expected.iter().map(|s| (s.name.as_str(), s)).collect();
    let have: HashMap<&str, &TensorSpec> = got.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut missing: Vec<&str> = want
        .keys()
        .filter(|n| !have.contains_key(*n))
        .copied()
        .collect();
    let mut extra: Vec<&str> = have
        .keys()
        .filter(|n| !want.contains_key(*n))
        .copied()
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        missing.sort_unstable();
        extra.sort_unstable();
        return Err(CoordinatorError::Tensor(format!(
            "tensor names differ from the run's schema: missing {missing:?}, unexpected {extra:?}"
        )));
    }
    for spec in expected {
        let other = have[spec.name.as_str()];
        if other.shape != spec.shape || other.dtype != spec.dtype {
            return Err(CoordinatorError::Tensor(format!(
                "tensor {:?} is {} {:?}, expected {} {:?}",
                spec.name, other.dtype, other.shape, spec.dtype, spec.shape
            )));
        }
    }
    Ok(())
}

fn to_f64(view: &TensorView<'_>) -> Vec<f64> {
    let data = view.data();
    match view.dtype() {
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect(),
        other => unreachable!("dtype {other} was rejected by schema_of"),
    }
}

fn from_f64(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.bitsize() / 8);
    for &v in values {
        match dtype {
            Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            Dtype::I64 => out.extend_from_slice(&(v.round() as i64).to_le_bytes()),
            Dtype::I32 => out.extend_from_slice(&(v.round() as i32).to_le_bytes()),
            other => unreachable!("dtype {other} was rejected by schema_of"),
        }
    }
    out
}

/// Metadata keys of an upload that describe the model rather than the upload, copied into the
/// average so that it can be used on its own (e.g. `flowersctl predict` checks the variant).
pub const MODEL_METADATA_KEYS: [&str; 3] = ["variant", "img_size", "num_classes"];

/// The [`MODEL_METADATA_KEYS`] entries of a safetensors buffer's `__metadata__` (none when it
/// is malformed: the average reports that).
pub fn model_metadata(bytes: &[u8]) -> HashMap<String, String> {
    let Ok((_, meta)) = SafeTensors::read_metadata(bytes) else {
        return HashMap::new();
    };
    meta.metadata()
        .iter()
        .flatten()
        .filter(|(k, _)| MODEL_METADATA_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Averages uploads `(safetensors bytes, samples)` weighted by samples (equal
/// weights when every worker trained none), which must all share one schema.
/// `metadata` goes into the result's safetensors header.
pub fn weighted_average(
    uploads: &[(&[u8], u64)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let first = uploads
        .first()
        .ok_or_else(|| CoordinatorError::Tensor("no uploads to average".into()))?;
    let schema = schema_of(first.0)?;
    let parsed: Vec<SafeTensors<'_>> = uploads
        .iter()
        .map(|(b, _)| parse(b))
        .collect::<Result<_>>()?;
    for (bytes, _) in &uploads[1..] {
        check_schema(&schema, &schema_of(bytes)?)?;
    }
    let total: u64 = uploads.iter().map(|(_, s)| s).sum();
    let weights: Vec<f64> = if total == 0 {
        vec![1.0; uploads.len()]
    } else {
        uploads.iter().map(|(_, s)| *s as f64).collect()
    };
    let weight_sum: f64 = weights.iter().sum();

    let mut averaged: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(schema.len());
    for spec in &schema {
        let mut acc: Option<Vec<f64>> = None;
        let mut dtype = Dtype::F32;
        for (tensors, &w) in parsed.iter().zip(&weights) {
            let view = tensors
                .tensor(&spec.name)
                .map_err(|e| CoordinatorError::Tensor(format!("{}: {e}", spec.name)))?;
            dtype = view.dtype();
            let values = to_f64(&view);
            match acc.as_mut() {
                None => acc = Some(values.into_iter().map(|v| v * w).collect()),
                Some(acc) => acc.iter_mut().zip(values).for_each(|(a, v)| *a += v * w),
            }
        }
        let mean: Vec<f64> = acc
            .unwrap_or_default()
            .into_iter()
            .map(|a| a / weight_sum)
            .collect();
        averaged.push((
            spec.name.clone(),
            dtype,
            spec.shape.clone(),
            from_f64(dtype, &mean),
        ));
    }
    let views = averaged
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data).map(|v| (name.as_str(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CoordinatorError::Tensor(format!("building the average: {e}")))?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| CoordinatorError::Tensor(format!("serializing the average: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_safetensors, f32_values};

    fn f32_tensors(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        f32_safetensors(tensors).unwrap()
    }

    fn read_f32(bytes: &[u8], name: &str) -> Vec<f32> {
        f32_values(bytes, name).unwrap()
    }

    #[test]
    fn weighted_mean_is_exact() {
        let a = f32_tensors(&[("w", vec![2], vec![1.0, 2.0]), ("b", vec![1], vec![-4.0])]);
        let b = f32_tensors(&[("w", vec![2], vec![5.0, 10.0]), ("b", vec![1], vec![4.0])]);
        let avg = weighted_average(&[(&a, 1), (&b, 3)], HashMap::new()).unwrap();
        assert_eq!(read_f32(&avg, "w"), vec![4.0, 8.0]);
        assert_eq!(read_f32(&avg, "b"), vec![2.0]);
    }

    #[test]
    fn zero_samples_everywhere_means_equal_weights() {
        let a = f32_tensors(&[("w", vec![1], vec![1.0])]);
        let b = f32_tensors(&[("w", vec![1], vec![3.0])]);
        let avg = weighted_average(&[(&a, 0), (&b, 0)], HashMap::new()).unwrap();
        assert_eq!(read_f32(&avg, "w"), vec![2.0]);
    }

    #[test]
    fn integer_and_half_tensors_average_in_their_dtype() {
        let mk = |n: i64, h: f32| {
            let ints = n.to_le_bytes().to_vec();
            let halves: Vec<u8> = half::bf16::from_f32(h).to_le_bytes().to_vec();
            let views = vec![
                ("n", TensorView::new(Dtype::I64, vec![], &ints).unwrap()),
                ("h", TensorView::new(Dtype::BF16, vec![1], &halves).unwrap()),
            ];
            safetensors::serialize(views, None).unwrap()
        };
        let (a, b) = (mk(10, 1.0), mk(13, 2.0));
        let avg = weighted_average(&[(&a, 1), (&b, 1)], HashMap::new()).unwrap();
        let t = SafeTensors::deserialize(&avg).unwrap();
        assert_eq!(t.tensor("n").unwrap().data(), 12i64.to_le_bytes()); // 11.5 rounds away from zero
        assert_eq!(
            t.tensor("h").unwrap().data(),
            half::bf16::from_f32(1.5).to_le_bytes()
        );
    }

    #[test]
    fn model_metadata_keeps_the_model_keys_only() {
        let data = 1.0f32.to_le_bytes();
        let views = vec![("w", TensorView::new(Dtype::F32, vec![1], &data).unwrap())];
        let meta = HashMap::from(
            [("variant", "tf2015"), ("img_size", "75"), ("worker", "w1")]
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let bytes = safetensors::serialize(views, Some(meta)).unwrap();
        let kept = model_metadata(&bytes);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            (kept["variant"].as_str(), kept["img_size"].as_str()),
            ("tf2015", "75")
        );
        assert!(model_metadata(b"garbage").is_empty());
    }

    #[test]
    fn schema_mismatches_are_named() {
        let a = schema_of(&f32_tensors(&[("w", vec![2], vec![1.0, 2.0])])).unwrap();
        let wrong_shape = schema_of(&f32_tensors(&[("w", vec![1, 2], vec![1.0, 2.0])])).unwrap();
        let err = check_schema(&a, &wrong_shape).unwrap_err().to_string();
        assert!(err.contains("\"w\"") && err.contains("[1, 2]"), "{err}");
        let renamed = schema_of(&f32_tensors(&[("v", vec![2], vec![1.0, 2.0])])).unwrap();
        let err = check_schema(&a, &renamed).unwrap_err().to_string();
        assert!(
            err.contains("missing [\"w\"]") && err.contains("unexpected [\"v\"]"),
            "{err}"
        );
        assert!(schema_of(b"garbage").is_err());
    }
}
