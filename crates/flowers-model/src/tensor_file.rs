//! Reading and writing named tch tensors as safetensors with string metadata (`__metadata__`).
//!
//! tch's own safetensors support has no metadata, which carries the variant and the checkpoint's
//! training state here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use atomic_write_file::AtomicWriteFile;
use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::ModelError;

/// Named tensors (sorted by name) plus the file's string metadata.
#[derive(Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn to_host(name: &str, t: &Tensor, path: &Path) -> Result<HostTensor, ModelError> {
    let kind = t.kind();
    let dtype = dtype_of(kind).ok_or_else(|| ModelError::UnstorableKind {
        path: path.to_path_buf(),
        name: name.to_owned(),
        kind,
    })?;
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(HostTensor {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    })
}

fn host_tensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    path: &Path,
) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let mut host = BTreeMap::new();
    for (name, t) in tensors {
        host.insert(name.to_string(), to_host(name, t, path)?);
    }
    Ok(host)
}

/// Writes `tensors` (copied to host) and `metadata` to `path` atomically: through a temporary
/// file of a unique name, synced with its folder before and after the rename, so that a crash
/// never leaves a truncated checkpoint under the final name.
pub fn write<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    metadata: &HashMap<String, String>,
) -> Result<(), ModelError> {
    let bytes = to_bytes(&path.display().to_string(), tensors, metadata)?;
    let io = |source| ModelError::io(path, source);
    let mut file = AtomicWriteFile::open(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.commit().map_err(io)
}

/// The safetensors bytes of `tensors` (copied to host) and `metadata`, e.g. to send over the
/// network; `what` names them in errors.
pub fn to_bytes<'a>(
    what: &str,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let path = Path::new(what);
    let host = host_tensors(tensors, path)?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::tensor::serialize(host.iter(), meta)
        .map_err(|source| ModelError::safetensors(path, source))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::io(path, source))
}

/// Reads only the metadata of a safetensors file.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, ModelError> {
    use std::io::Read;
    // Only the header is needed; weights files are large.
    let io = |source| ModelError::io(path, source);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(ModelError::HeaderLength {
            path: path.to_path_buf(),
            length: n,
        });
    }
    let mut buf = len.to_vec();
    buf.resize(8 + n as usize, 0);
    file.read_exact(&mut buf[8..]).map_err(io)?;
    // read_metadata checks the header against the buffer length, which here is just the header:
    // parse the JSON part ourselves instead.
    parse_header_metadata(path, &buf[8..])
}

fn parse_header_metadata(
    path: &Path,
    header: &[u8],
) -> Result<HashMap<String, String>, ModelError> {
    let text = std::str::from_utf8(header).map_err(|source| ModelError::HeaderNotUtf8 {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| ModelError::HeaderNotJson {
            path: path.to_path_buf(),
            source,
        })?;
    let mut out = HashMap::new();
    if let Some(meta) = value.get("__metadata__") {
        let obj = meta
            .as_object()
            .ok_or_else(|| ModelError::MetadataNotObject {
                path: path.to_path_buf(),
            })?;
        for (k, v) in obj {
            let v = v.as_str().ok_or_else(|| ModelError::MetadataNotString {
                path: path.to_path_buf(),
                key: k.clone(),
            })?;
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(out)
}

/// Reads every tensor (onto the CPU) and the metadata of a safetensors file.
pub fn read(path: &Path) -> Result<TensorFile, ModelError> {
    from_bytes(path, &read_bytes(path)?)
}

/// Parses safetensors bytes (tensors onto the CPU); `path` names them in errors.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<TensorFile, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::safetensors(path, e))?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::safetensors(path, e))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| ModelError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: view.dtype(),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        tensors.insert(name, t);
    }
    Ok(TensorFile {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25, 0.0]).view([2, 2]);
        let b = Tensor::from(7i64);
        let c = Tensor::from_slice(&[1u8, 2, 3]);
        let meta = HashMap::from([("variant".to_string(), "tf2015".to_string())]);
        write(&path, [("a", &a), ("b", &b), ("c", &c)], &meta).unwrap();
        let f = read(&path).unwrap();
        assert_eq!(f.metadata, meta);
        assert_eq!(read_metadata(&path).unwrap(), meta);
        assert!(f.tensors["a"].equal(&a) && f.tensors["b"].equal(&b) && f.tensors["c"].equal(&c));
        assert_eq!(f.tensors["b"].size(), Vec::<i64>::new());
        assert!(!dir.path().join("t.safetensors.tmp").exists());
        let bytes = to_bytes("upload", [("a", &a), ("b", &b)], &meta).unwrap();
        let back = from_bytes(Path::new("upload"), &bytes).unwrap();
        assert_eq!(back.metadata, meta);
        assert!(back.tensors["a"].equal(&a) && back.tensors["b"].equal(&b));
        assert_eq!(back.tensors.len(), 2);
    }

    #[test]
    fn names_the_file_when_it_is_not_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"\x05\0\0\0\0\0\0\0{oops").unwrap();
        for err in [read(&path).unwrap_err(), read_metadata(&path).unwrap_err()] {
            assert!(err.to_string().contains("junk.safetensors"), "{err}");
        }
        let missing = dir.path().join("none.safetensors");
        assert!(read_metadata(&missing)
            .unwrap_err()
            .to_string()
            .contains("none.safetensors"));
    }
}
