//! `imagelabels.mat`, `setid.mat` and `cat_to_name.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use matfile::{MatFile, NumericData};

use crate::DatasetError;

fn read_mat(path: &Path) -> Result<MatFile, DatasetError> {
    let file = std::fs::File::open(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    MatFile::parse(std::io::BufReader::new(file)).map_err(|source| DatasetError::MatParse {
        path: path.to_path_buf(),
        source,
    })
}

/// The variable `name` of `mat` as a vector of positive integers; it must be a 1xN or Nx1 real
/// numeric array.
fn positive_int_vector(path: &Path, mat: &MatFile, name: &str) -> Result<Vec<u32>, DatasetError> {
    let content = |message: String| DatasetError::MatContent {
        path: path.to_path_buf(),
        message,
    };
    let array = mat
        .find_by_name(name)
        .ok_or_else(|| content(format!("no numeric variable `{name}`")))?;
    let size = array.size();
    if size.len() != 2 || (size[0] != 1 && size[1] != 1) {
        return Err(content(format!(
            "`{name}` must be a 1xN or Nx1 vector, found shape {size:?}"
        )));
    }
    let values = as_f64(array.data())
        .ok_or_else(|| content(format!("`{name}` must be real, found complex values")))?;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v >= 1.0 && v <= u32::MAX as f64 && v.fract() == 0.0 {
                Ok(v as u32)
            } else {
                Err(content(format!(
                    "`{name}`[{}] = {v} is not a positive integer",
                    i + 1
                )))
            }
        })
        .collect()
}

/// Real numeric data widened to f64; `None` for complex arrays.
fn as_f64(data: &NumericData) -> Option<Vec<f64>> {
    macro_rules! widen {
        ($($variant:ident),*) => {
            match data {
                $(NumericData::$variant { real, imag: None } => {
                    Some(real.iter().map(|&v| v as f64).collect())
                })*
                _ => None,
            }
        };
    }
    widen!(Int8, UInt8, Int16, UInt16, Int32, UInt32, Int64, UInt64, Single, Double)
}

/// Class labels by image number, from `imagelabels.mat` (`labels`: 1..=102 for images 1..=N).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// 0-based class of image number i+1.
    zero_based: Vec<u32>,
    num_classes: u32,
}

impl Labels {
    pub fn from_mat_file(path: &Path) -> Result<Self, DatasetError> {
        let mat = read_mat(path)?;
        let one_based = positive_int_vector(path, &mat, "labels")?;
        if one_based.is_empty() {
            return Err(DatasetError::MatContent {
                path: path.to_path_buf(),
                message: "`labels` is empty".into(),
            });
        }
        Ok(Self::from_vec(one_based))
    }

    /// From 1-based labels as stored in the MAT file (entry i labels image number i+1).
    ///
    /// # Panics
    /// If a label is 0.
    pub fn from_vec(one_based: Vec<u32>) -> Self {
        assert!(
            one_based.iter().all(|&l| l >= 1),
            "labels are 1-based; found a 0"
        );
        let num_classes = one_based.iter().copied().max().unwrap_or(0);
        Self {
            zero_based: one_based.into_iter().map(|l| l - 1).collect(),
            num_classes,
        }
    }

    /// The 0-based class of image `number` (1-based, as in `image_00042.jpg`).
    pub fn label_of(&self, number: u32) -> Option<u32> {
        let index = usize::try_from(number).ok()?.checked_sub(1)?;
        self.zero_based.get(index).copied()
    }

    /// The number of classes: the largest label.
    pub fn num_classes(&self) -> u32 {
        self.num_classes
    }

    /// How many images have a label.
    pub fn len(&self) -> usize {
        self.zero_based.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zero_based.is_empty()
    }
}

/// One of the official id lists of `setid.mat`; parses case-insensitively from, and displays as,
/// its variable name.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[strum(
    serialize_all = "lowercase",
    ascii_case_insensitive,
    parse_err_ty = String,
    parse_err_fn = unknown_set
)]
pub enum SetName {
    Trnid,
    Valid,
    Tstid,
}

fn unknown_set(name: &str) -> String {
    format!("unknown set `{name}` (expected trnid, valid or tstid)")
}

impl SetName {
    /// The variable name in `setid.mat`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The official image-number lists of `setid.mat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetIds {
    trnid: Vec<u32>,
    valid: Vec<u32>,
    tstid: Vec<u32>,
}

impl SetIds {
    pub fn from_mat_file(path: &Path) -> Result<Self, DatasetError> {
        let mat = read_mat(path)?;
        let read = |set: SetName| positive_int_vector(path, &mat, set.as_str());
        Ok(Self {
            trnid: read(SetName::Trnid)?,
            valid: read(SetName::Valid)?,
            tstid: read(SetName::Tstid)?,
        })
    }

    pub fn new(trnid: Vec<u32>, valid: Vec<u32>, tstid: Vec<u32>) -> Self {
        Self {
            trnid,
            valid,
            tstid,
        }
    }

    /// The image numbers of `set`.
    pub fn get(&self, set: SetName) -> &[u32] {
        match set {
            SetName::Trnid => &self.trnid,
            SetName::Valid => &self.valid,
            SetName::Tstid => &self.tstid,
        }
    }
}

/// Class display names from `cat_to_name.json` (`{"1": "pink primrose", ...}`, 1-based keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassNames {
    by_label: HashMap<u32, String>,
}

impl ClassNames {
    pub fn from_json_file(path: &Path) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses `cat_to_name.json` text already in memory (e.g. a copy bundled in a binary);
    /// `origin` is what errors name.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, DatasetError> {
        let path = || PathBuf::from(origin);
        let map: HashMap<String, String> =
            serde_json::from_str(text).map_err(|source| DatasetError::ClassNames {
                path: path(),
                source,
            })?;
        let by_label = map
            .into_iter()
            .map(|(key, name)| match key.trim().parse::<u32>() {
                Ok(class) if class >= 1 => Ok((class - 1, name)),
                _ => Err(DatasetError::ClassNumber { path: path(), key }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { by_label })
    }

    /// The name of 0-based class `label`.
    pub fn name(&self, label: u32) -> Option<&str> {
        self.by_label.get(&label).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_label.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_label.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matwriter::{write_mat, MatVar};

    #[test]
    fn labels_from_a_generated_mat_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imagelabels.mat");
        write_mat(&path, &[MatVar::row("labels", &[3.0, 1.0, 2.0, 3.0])]).unwrap();
        let labels = Labels::from_mat_file(&path).unwrap();
        assert_eq!(labels.len(), 4);
        assert_eq!(labels.num_classes(), 3);
        assert_eq!(labels.label_of(1), Some(2));
        assert_eq!(labels.label_of(2), Some(0));
        assert_eq!(labels.label_of(4), Some(2));
        assert_eq!(labels.label_of(0), None);
        assert_eq!(labels.label_of(5), None);

        // A column vector is accepted too.
        let column = dir.path().join("column.mat");
        let data = [1.0, 2.0];
        write_mat(
            &column,
            &[MatVar {
                name: "labels",
                rows: 2,
                cols: 1,
                data: &data,
            }],
        )
        .unwrap();
        assert_eq!(Labels::from_mat_file(&column).unwrap().label_of(2), Some(1));
    }

    #[test]
    fn wrong_mat_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let matrix = dir.path().join("matrix.mat");
        let data = [1.0; 6];
        write_mat(
            &matrix,
            &[MatVar {
                name: "labels",
                rows: 2,
                cols: 3,
                data: &data,
            }],
        )
        .unwrap();
        let err = Labels::from_mat_file(&matrix).unwrap_err().to_string();
        assert!(err.contains("matrix.mat") && err.contains("1xN"), "{err}");

        let unnamed = dir.path().join("other.mat");
        write_mat(&unnamed, &[MatVar::row("lbl", &[1.0])]).unwrap();
        let err = Labels::from_mat_file(&unnamed).unwrap_err().to_string();
        assert!(
            err.contains("other.mat") && err.contains("`labels`"),
            "{err}"
        );

        let fractional = dir.path().join("frac.mat");
        write_mat(&fractional, &[MatVar::row("labels", &[1.0, 2.5])]).unwrap();
        let err = Labels::from_mat_file(&fractional).unwrap_err().to_string();
        assert!(
            err.contains("frac.mat") && err.contains("[2] = 2.5"),
            "{err}"
        );

        let garbage = dir.path().join("garbage.mat");
        std::fs::write(&garbage, b"not a mat file at all").unwrap();
        let err = Labels::from_mat_file(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("garbage.mat") && err.contains("MAT v5"),
            "{err}"
        );

        let missing = dir.path().join("missing.mat");
        let err = Labels::from_mat_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.mat"), "{err}");
    }

    #[test]
    fn set_ids_need_all_three_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("setid.mat");
        write_mat(
            &path,
            &[
                MatVar::row("trnid", &[1.0, 2.0]),
                MatVar::row("valid", &[3.0]),
                MatVar::row("tstid", &[4.0, 5.0]),
            ],
        )
        .unwrap();
        let sets = SetIds::from_mat_file(&path).unwrap();
        assert_eq!(sets.get(SetName::Trnid), &[1, 2]);
        assert_eq!(sets.get(SetName::Valid), &[3]);
        assert_eq!(sets.get(SetName::Tstid), &[4, 5]);

        let partial = dir.path().join("partial.mat");
        write_mat(
            &partial,
            &[MatVar::row("trnid", &[1.0]), MatVar::row("valid", &[2.0])],
        )
        .unwrap();
        let err = SetIds::from_mat_file(&partial).unwrap_err().to_string();
        assert!(
            err.contains("partial.mat") && err.contains("`tstid`"),
            "{err}"
        );
    }

    #[test]
    fn set_names_parse() {
        assert_eq!("valid".parse::<SetName>(), Ok(SetName::Valid));
        assert_eq!("TSTID".parse::<SetName>(), Ok(SetName::Tstid));
        assert!("test".parse::<SetName>().is_err());
        assert_eq!(
            "test".parse::<SetName>().unwrap_err(),
            "unknown set `test` (expected trnid, valid or tstid)"
        );
        assert_eq!(SetName::Trnid.to_string(), "trnid");
        assert_eq!(SetName::Tstid.as_str(), "tstid");
    }

    #[test]
    fn class_names_from_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat_to_name.json");
        std::fs::write(&path, r#"{"1": "pink primrose", "102": "blackberry lily"}"#).unwrap();
        let names = ClassNames::from_json_file(&path).unwrap();
        assert_eq!(names.name(0), Some("pink primrose"));
        assert_eq!(names.name(101), Some("blackberry lily"));
        assert_eq!(names.name(1), None);

        std::fs::write(&path, r#"{"zero": "x"}"#).unwrap();
        let err = ClassNames::from_json_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("cat_to_name.json") && err.contains("zero"),
            "{err}"
        );

        let names = ClassNames::from_json_str(r#"{"2": "x"}"#, Path::new("bundled")).unwrap();
        assert_eq!((names.len(), names.name(1)), (1, Some("x")));
        let err = ClassNames::from_json_str("[", Path::new("bundled names"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bundled names"), "{err}");
    }
}
