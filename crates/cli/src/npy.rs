//! `.npy` files: 2-D float32/float64 and bool arrays in, float arrays out.
//!
//! Reading accepts C and Fortran order and either byte order (numpy's `<f8`, `>f4`, …);
//! the array must be 2-D (rows are tokens, as in numpy's `X @ W`). Writing always gives
//! little-endian, C-ordered files of the matrix's own type. Every error names the file.

use std::fs::File;
use std::io::{BufWriter, ErrorKind};
use std::path::Path;
use std::str::FromStr;

use attention_core::Element;
use nalgebra::{DMatrix, DVector};
use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar, WriterBuilder};

use crate::{Error, Result};

/// A float type this tool computes in: `f32` (numpy `float32`) or `f64` (`float64`).
pub trait NpyFloat:
    Element + npyz::Deserialize + npyz::Serialize + FromStr + std::fmt::Display
{
    /// numpy's name of the type (`"float32"`).
    const NAME: &'static str;
    /// The dtype written to output files: little-endian (`"<f4"`).
    const DESCR: &'static str;
    /// The matrix, if it holds this type.
    fn take(m: FloatMatrix) -> Option<DMatrix<Self>>;
}

impl NpyFloat for f32 {
    const NAME: &'static str = "float32";
    const DESCR: &'static str = "<f4";
    fn take(m: FloatMatrix) -> Option<DMatrix<Self>> {
        match m {
            FloatMatrix::F32(m) => Some(m),
            FloatMatrix::F64(_) => None,
        }
    }
}

impl NpyFloat for f64 {
    const NAME: &'static str = "float64";
    const DESCR: &'static str = "<f8";
    fn take(m: FloatMatrix) -> Option<DMatrix<Self>> {
        match m {
            FloatMatrix::F64(m) => Some(m),
            FloatMatrix::F32(_) => None,
        }
    }
}

/// A float matrix read from a file, in the file's own precision.
#[derive(Clone, Debug, PartialEq)]
pub enum FloatMatrix {
    /// A `float32` file.
    F32(DMatrix<f32>),
    /// A `float64` file.
    F64(DMatrix<f64>),
}

impl FloatMatrix {
    /// numpy's name of the element type (`"float32"` or `"float64"`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            FloatMatrix::F32(_) => f32::NAME,
            FloatMatrix::F64(_) => f64::NAME,
        }
    }
}

/// What a `.npy` file holds, before its values are read.
struct Loaded {
    /// The parsed header: dtype, shape, order.
    header: NpyHeader,
    /// The whole file.
    bytes: Vec<u8>,
    /// Where the data starts in `bytes` (the rest is exactly `len × item size` bytes,
    /// checked by [`load`]).
    start: usize,
}

/// The element type of a header, when it is one this tool reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32,
    F64,
    Bool,
}

/// Reads a 2-D float32 or float64 array.
///
/// # Errors
/// A missing or unreadable file, a malformed `.npy`, a dtype other than float32/float64
/// (named with numpy's name and type string, e.g. `int64 ('<i8')`), or an array that is
/// not 2-D.
pub fn read_float_matrix(path: &Path) -> Result<FloatMatrix> {
    let loaded = load(path)?;
    match kind(path, &loaded.header)? {
        Kind::F32 => Ok(FloatMatrix::F32(to_matrix(path, loaded)?)),
        Kind::F64 => Ok(FloatMatrix::F64(to_matrix(path, loaded)?)),
        Kind::Bool => Err(Error(format!(
            "{}: expected a float32 or float64 array, found dtype bool",
            path.display()
        ))),
    }
}

/// Reads a 2-D bool array (a mask: `true` = may attend).
///
/// # Errors
/// Those of [`read_float_matrix`], with bool as the one accepted dtype.
pub fn read_bool_matrix(path: &Path) -> Result<DMatrix<bool>> {
    let loaded = load(path)?;
    match kind(path, &loaded.header)? {
        Kind::Bool => to_matrix(path, loaded),
        other => Err(Error(format!(
            "{}: a mask must be a bool array, found dtype {}",
            path.display(),
            match other {
                Kind::F32 => f32::NAME,
                _ => f64::NAME,
            }
        ))),
    }
}

/// Writes `m` as a little-endian, C-ordered 2-D array of `T`.
///
/// # Errors
/// The file cannot be created or written.
pub fn write_matrix<T: NpyFloat>(path: &Path, m: &DMatrix<T>) -> Result<()> {
    let shape = [m.nrows() as u64, m.ncols() as u64];
    // Row-major order: row 0 left to right, then row 1, …
    let values = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]));
    write_values::<T>(path, &shape, values)
}

/// Writes `v` as a little-endian 1-D array of `T`.
///
/// # Errors
/// The file cannot be created or written.
pub fn write_vector<T: NpyFloat>(path: &Path, v: &DVector<T>) -> Result<()> {
    write_values::<T>(path, &[v.len() as u64], v.iter().copied())
}

/// Writes an array of `shape` whose values, in C order, are `values`.
fn write_values<T: NpyFloat>(
    path: &Path,
    shape: &[u64],
    values: impl Iterator<Item = T>,
) -> Result<()> {
    let failed = |e: std::io::Error| Error(format!("cannot write {}: {e}", path.display()));
    let dtype = DType::Plain(T::DESCR.parse().expect("a valid type string"));
    let file = File::create(path).map_err(failed)?;
    let mut writer = npyz::WriteOptions::new()
        .dtype(dtype)
        .shape(shape)
        .writer(BufWriter::new(file))
        .begin_nd()
        .map_err(failed)?;
    for x in values {
        writer.push(&x).map_err(failed)?;
    }
    writer.finish().map_err(failed)
}

/// Reads the file and its header; checks that the data is exactly as long as the header
/// says (a truncated file or trailing bytes are errors, caught before anything is
/// allocated for the values).
fn load(path: &Path) -> Result<Loaded> {
    let name = path.display();
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error(format!("{name}: no such file")),
        _ => Error(format!("cannot read {name}: {e}")),
    })?;
    check_element_count(path, &bytes)?;
    let npy = NpyFile::new(&bytes[..])
        .map_err(|e| Error(format!("{name}: not a valid .npy file ({e})")))?;
    let header = npy.header().clone();
    let data = npy.into_inner();
    let start = bytes.len() - data.len();
    let item = match &header.dtype() {
        DType::Plain(t) => t.num_bytes(),
        _ => None,
    };
    if let Some(item) = item {
        let expected = header.len().checked_mul(item as u64);
        if expected != Some(data.len() as u64) {
            return Err(Error(format!(
                "{name}: not a valid .npy file (the header promises {} values of {item} bytes, \
                 shape {}, but {} bytes of data follow)",
                header.len(),
                shape_text(header.shape()),
                data.len()
            )));
        }
    }
    Ok(Loaded {
        header,
        bytes,
        start,
    })
}

/// Rejects a header whose shape has more elements than a `u64` counts.
///
/// npyz multiplies the shape's entries without checking (a panic in builds with overflow
/// checks, a wrapped count in others), so this looks at the header's `'shape': (…)` text
/// before npyz parses it. A header it cannot read is left to npyz to reject.
fn check_element_count(path: &Path, bytes: &[u8]) -> Result<()> {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(1 << 16)]);
    let Some(shape) = head.split_once("shape").map(|(_, rest)| rest) else {
        return Ok(());
    };
    let Some(tuple) = shape.split_once('(').and_then(|(_, t)| t.split_once(')')) else {
        return Ok(());
    };
    let count = tuple
        .0
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .try_fold(1u64, |n, d| {
            d.parse::<u64>().ok().map_or(Some(n), |d| n.checked_mul(d))
        });
    match count {
        Some(_) => Ok(()),
        None => Err(Error(format!(
            "{}: not a valid .npy file (shape ({}) has too many elements)",
            path.display(),
            tuple.0.trim()
        ))),
    }
}

/// The element type, or an error naming the file's dtype.
fn kind(path: &Path, header: &NpyHeader) -> Result<Kind> {
    let dtype = header.dtype();
    if let DType::Plain(t) = &dtype {
        match (t.type_char(), t.num_bytes()) {
            (TypeChar::Float, Some(4)) => return Ok(Kind::F32),
            (TypeChar::Float, Some(8)) => return Ok(Kind::F64),
            (TypeChar::Bool, Some(1)) => return Ok(Kind::Bool),
            _ => {}
        }
    }
    Err(Error(format!(
        "{}: unsupported dtype {} (supported: float32, float64; bool for masks)",
        path.display(),
        dtype_text(&dtype)
    )))
}

/// numpy's name of a dtype and its type string, e.g. `int64 ('<i8')`.
fn dtype_text(dtype: &DType) -> String {
    match dtype {
        DType::Plain(t) => {
            let bits = t.num_bytes().map_or(0, |b| 8 * b);
            let name = match t.type_char() {
                TypeChar::Bool => "bool".to_string(),
                TypeChar::Int => format!("int{bits}"),
                TypeChar::Uint => format!("uint{bits}"),
                TypeChar::Float => format!("float{bits}"),
                TypeChar::Complex => format!("complex{bits}"),
                TypeChar::TimeDelta => "timedelta64".to_string(),
                TypeChar::DateTime => "datetime64".to_string(),
                TypeChar::ByteStr => "bytes".to_string(),
                TypeChar::UnicodeStr => "str".to_string(),
                TypeChar::Object => "object".to_string(),
                _ => "raw data".to_string(),
            };
            format!("{name} ('{t}')")
        }
        DType::Array(..) => "sub-array".to_string(),
        DType::Record(_) => "structured (record)".to_string(),
    }
}

/// A shape as numpy prints it: `(3,)`, `(2, 3)`.
fn shape_text(shape: &[u64]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(u64::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// The values of a 2-D array as a matrix, honouring the file's order.
fn to_matrix<T: npyz::Deserialize + nalgebra::Scalar>(
    path: &Path,
    loaded: Loaded,
) -> Result<DMatrix<T>> {
    let name = path.display();
    let shape = loaded.header.shape().to_vec();
    let &[rows, cols] = &shape[..] else {
        return Err(Error(format!(
            "{name}: expected a 2-D array (a matrix), found a {}-D array of shape {}",
            shape.len(),
            shape_text(&shape)
        )));
    };
    let too_large = || Error(format!("{name}: shape {} is too large", shape_text(&shape)));
    let rows = usize::try_from(rows).map_err(|_| too_large())?;
    let cols = usize::try_from(cols).map_err(|_| too_large())?;
    let order = loaded.header.order();
    let values: Vec<T> = NpyFile::with_header(loaded.header, &loaded.bytes[loaded.start..])
        .into_vec()
        .map_err(|e| Error(format!("{name}: not a valid .npy file ({e})")))?;
    Ok(match order {
        Order::C => DMatrix::from_row_slice(rows, cols, &values),
        // Fortran order is column-major, nalgebra's own storage order.
        Order::Fortran => DMatrix::from_vec(rows, cols, values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_keeps_every_value_and_the_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.npy");
        let m = DMatrix::<f32>::from_fn(3, 5, |i, j| (i * 10 + j) as f32 + 0.25);
        write_matrix(&path, &m).unwrap();
        assert_eq!(read_float_matrix(&path).unwrap(), FloatMatrix::F32(m));

        let m = DMatrix::<f64>::from_fn(4, 2, |i, j| (i as f64 + 2.0 * j as f64).sin());
        write_matrix(&path, &m).unwrap();
        assert_eq!(read_float_matrix(&path).unwrap(), FloatMatrix::F64(m));
    }

    #[test]
    fn shapes_print_like_numpy() {
        assert_eq!(shape_text(&[3]), "(3,)");
        assert_eq!(shape_text(&[2, 3, 4]), "(2, 3, 4)");
    }
}
