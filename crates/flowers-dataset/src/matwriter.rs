//! A minimal MAT v5 (level 5) writer: uncompressed, named, real double matrices.
//!
//! Only what tests need to produce `imagelabels.mat` / `setid.mat` look-alikes; behind the
//! `testing` feature, so that other crates' tests can use it too.

use std::io;
use std::path::Path;

const MI_INT8: u32 = 1;
const MI_UINT32: u32 = 6;
const MI_INT32: u32 = 5;
const MI_DOUBLE: u32 = 9;
const MI_MATRIX: u32 = 14;
const MX_DOUBLE_CLASS: u32 = 6;

/// One named `rows` x `cols` double matrix; `data` is column-major (MATLAB order).
#[derive(Debug, Clone, Copy)]
pub struct MatVar<'a> {
    pub name: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [f64],
}

impl<'a> MatVar<'a> {
    /// A 1xN row vector, the shape of `imagelabels.mat`'s `labels` and `setid.mat`'s ids.
    pub fn row(name: &'a str, data: &'a [f64]) -> Self {
        Self {
            name,
            rows: 1,
            cols: data.len(),
            data,
        }
    }
}

/// The bytes of a MAT v5 file holding `vars`.
///
/// # Panics
/// If a variable's `data` length is not `rows * cols`.
pub fn mat_bytes(vars: &[MatVar<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut text = b"MATLAB 5.0 MAT-file, written by flowers-dataset matwriter".to_vec();
    text.resize(116, b' ');
    out.extend_from_slice(&text);
    out.extend_from_slice(&[0u8; 8]); // no subsystem data
    out.extend_from_slice(&0x0100u16.to_le_bytes());
    out.extend_from_slice(b"IM"); // little-endian marker as read by a little-endian reader

    for var in vars {
        assert_eq!(
            var.data.len(),
            var.rows * var.cols,
            "MAT variable {}: data length does not match its shape",
            var.name
        );
        let mut body = Vec::new();
        element(
            &mut body,
            MI_UINT32,
            &[MX_DOUBLE_CLASS, 0].map(u32::to_le_bytes).concat(),
        );
        element(
            &mut body,
            MI_INT32,
            &[var.rows as i32, var.cols as i32]
                .map(i32::to_le_bytes)
                .concat(),
        );
        element(&mut body, MI_INT8, var.name.as_bytes());
        let real: Vec<u8> = var.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        element(&mut body, MI_DOUBLE, &real);
        element(&mut out, MI_MATRIX, &body);
    }
    out
}

/// Writes `vars` to a MAT v5 file at `path`.
pub fn write_mat(path: &Path, vars: &[MatVar<'_>]) -> io::Result<()> {
    std::fs::write(path, mat_bytes(vars))
}

/// Appends a data element (tag + payload padded to 8 bytes).
fn element(out: &mut Vec<u8>, data_type: u32, payload: &[u8]) {
    out.extend_from_slice(&data_type.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matfile_reads_back_what_we_write() {
        let bytes = mat_bytes(&[
            MatVar::row("labels", &[1.0, 2.0, 102.0]),
            MatVar {
                name: "m",
                rows: 2,
                cols: 2,
                data: &[1.0, 2.0, 3.0, 4.0],
            },
        ]);
        let mat = matfile::MatFile::parse(&bytes[..]).unwrap();
        let labels = mat.find_by_name("labels").unwrap();
        assert_eq!(labels.size(), &vec![1, 3]);
        match labels.data() {
            matfile::NumericData::Double { real, imag: None } => {
                assert_eq!(real, &vec![1.0, 2.0, 102.0])
            }
            other => panic!("unexpected data {other:?}"),
        }
        assert_eq!(mat.find_by_name("m").unwrap().size(), &vec![2, 2]);
    }
}
