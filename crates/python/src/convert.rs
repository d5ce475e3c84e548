//! Python objects → nalgebra views, and nalgebra results → numpy arrays: the one place
//! where dtypes are decided and where numpy memory is read or written.
//!
//! A call converts its operands in two steps:
//! 1. [`float_array`]: any object → a numpy array of `float32` or `float64` (integer and
//!    bool arrays, and Python lists, become `float64` as numpy's `asarray(...,
//!    dtype=float64)` would make them); [`call_dtype`] then requires one dtype for all of
//!    the call's data operands.
//! 2. [`Input::new`]: that array → a read-only borrow from which [`Input::view`] makes a
//!    [`MatRef`] over numpy's memory (no copy), unless the layout cannot be expressed as
//!    an nalgebra view (see [`readable_in_place`]), in which case a C-ordered copy is
//!    read instead.
//!
//! Results are new C-ordered arrays ([`new_output`]), written through a [`MatMut`] view.

use std::mem::{align_of, size_of};

use attention_core::{AttentionError as CoreError, MatMut, MatRef, Operand};
use nalgebra::Dyn;
use numpy::{
    Element as NpElement, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use crate::AttentionError;

/// The element type of a call, decided once from its data operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `numpy.float32`, Rust `f32`.
    F32,
    /// `numpy.float64`, Rust `f64`.
    F64,
}

impl Dtype {
    /// numpy's name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
        }
    }
}

/// Runs `$body` with the type alias `$t` set to `f32` or `f64` according to `$dtype`: the
/// crate's single dtype dispatch. Every function is written once, generic over the element
/// type, and instantiated here.
macro_rules! dispatch {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::convert::Dtype::F32 => {
                type $t = f32;
                $body
            }
            $crate::convert::Dtype::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}
pub(crate) use dispatch;

/// The element types this crate computes in: the core's `Element` that numpy can hold.
pub trait Float: attention_core::Element + NpElement {}
impl Float for f32 {}
impl Float for f64 {}

/// The `numpy` module, imported once.
fn numpy_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static NUMPY: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    NUMPY
        .get_or_try_init(py, || Ok(py.import("numpy")?.unbind()))
        .map(|m| m.bind(py))
}

/// `obj` as a numpy array of `float32` or `float64`, with that dtype.
///
/// numpy arrays of `float32` / `float64` (native byte order) pass through untouched; any
/// other object goes through `numpy.asarray` first; bool and integer arrays become
/// `float64` (a copy), non-native float32/float64 a native copy. Any other dtype
/// (float16, longdouble, complex, object, strings, ...) is a `TypeError` naming `name`.
pub fn float_array<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<(Dtype, Bound<'py, PyUntypedArray>)> {
    // Fast path: already an array of the right type.
    if obj.cast::<PyArrayDyn<f32>>().is_ok() {
        return Ok((Dtype::F32, obj.cast::<PyUntypedArray>()?.clone()));
    }
    if obj.cast::<PyArrayDyn<f64>>().is_ok() {
        return Ok((Dtype::F64, obj.cast::<PyUntypedArray>()?.clone()));
    }
    let py = obj.py();
    let np = numpy_module(py)?;
    let array = match obj.cast::<PyUntypedArray>() {
        Ok(a) => a.clone(),
        Err(_) => np
            .call_method1("asarray", (obj,))?
            .cast_into::<PyUntypedArray>()?,
    };
    let dtype = array.dtype();
    let target = match (dtype.kind(), dtype.itemsize()) {
        (b'b' | b'i' | b'u', _) | (b'f', 8) => Dtype::F64,
        (b'f', 4) => Dtype::F32,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{name} has dtype {}: attention computes in float32 or float64 \
                 (integer and bool arrays are converted to float64)",
                dtype.str()?
            )));
        }
    };
    let converted = array.call_method1("astype", (target.name(),))?;
    Ok((target, converted.cast_into::<PyUntypedArray>()?))
}

/// The one dtype of a call's data operands (already converted by [`float_array`]); a
/// `TypeError` listing each operand's dtype if float32 and float64 are mixed.
pub fn call_dtype(operands: &[(&str, Dtype)]) -> PyResult<Dtype> {
    let first = operands.first().map_or(Dtype::F64, |(_, d)| *d);
    if operands.iter().all(|(_, d)| *d == first) {
        return Ok(first);
    }
    let list: Vec<String> = operands
        .iter()
        .map(|(name, d)| format!("{name} is {}", d.name()))
        .collect();
    Err(PyTypeError::new_err(format!(
        "mixed float32 and float64 operands ({}); convert them to one dtype, e.g. with \
         .astype(numpy.float64)",
        list.join(", ")
    )))
}

/// Whether numpy's memory of `array` can be read in place as an nalgebra view: the data
/// pointer aligned for `T`, every stride non-negative, and each axis of more than one
/// element a positive multiple of the item size. Zero strides (`broadcast_to`), negative
/// strides (`a[::-1]`), strides that split items and misaligned data (e.g. a view into a
/// packed record array) are copied instead.
fn readable_in_place<T: NpElement>(array: &Bound<'_, PyArrayDyn<T>>) -> bool {
    let item = size_of::<T>() as isize;
    let aligned = (array.data() as usize).is_multiple_of(align_of::<T>());
    aligned
        && array
            .shape()
            .iter()
            .zip(array.strides())
            .all(|(&n, &s)| s >= 0 && (n <= 1 || (s > 0 && s % item == 0)))
}

/// A matrix operand borrowed read-only from numpy for the length of a call (numpy's own
/// array, or a contiguous copy of it).
pub struct Input<'py, T: Float> {
    array: PyReadonlyArray2<'py, T>,
}

/// An error naming `name` for an array of the wrong number of dimensions.
fn ndim_error(name: &str, array: &Bound<'_, PyUntypedArray>, want: usize) -> PyErr {
    AttentionError::new_err(format!(
        "{name} must be a {want}-D array, but it has {} dimension(s) (shape {:?})",
        array.ndim(),
        array.shape()
    ))
}

/// `array` as a typed numpy array with the layout [`readable_in_place`] requires: itself,
/// or a C-ordered copy.
fn readable<'py, T: NpElement>(
    array: &Bound<'py, PyArrayDyn<T>>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if readable_in_place(array) {
        return Ok(array.clone());
    }
    // `ndarray.copy` always allocates: aligned, C-ordered, standard strides.
    Ok(array
        .call_method1("copy", ("C",))?
        .cast_into::<PyArrayDyn<T>>()?)
}

impl<'py, T: Float> Input<'py, T> {
    /// Borrows `array` (of dtype `T`, from [`float_array`]) as a 2-D matrix; an
    /// [`AttentionError`] naming `name` if it is not 2-D.
    pub fn new(name: &str, array: &Bound<'py, PyUntypedArray>) -> PyResult<Self> {
        if array.ndim() != 2 {
            return Err(ndim_error(name, array, 2));
        }
        let array = readable(array.cast::<PyArrayDyn<T>>()?)?.cast_into::<PyArray2<T>>()?;
        Ok(Input {
            array: array.try_readonly()?,
        })
    }

    /// The matrix as an nalgebra view of numpy's memory, for as long as the borrow.
    pub fn view(&self) -> PyResult<MatRef<'_, T>> {
        self.array
            .try_as_matrix::<Dyn, Dyn, Dyn, Dyn>()
            .ok_or_else(|| PyRuntimeError::new_err("internal error: unreadable array layout"))
    }
}

/// A boolean mask borrowed from numpy: a `bool` array (a `TypeError` otherwise: additive
/// float masks go in `bias`), 2-D or, for a key mask, 1-D.
pub struct Mask<'py> {
    array: Bound<'py, PyArrayDyn<bool>>,
}

impl<'py> Mask<'py> {
    /// `obj` as a boolean array with `ndim` dimensions.
    pub fn new(name: &str, obj: &Bound<'py, PyAny>, ndim: usize) -> PyResult<Self> {
        let array = match obj.cast::<PyUntypedArray>() {
            Ok(a) => a.clone(),
            Err(_) => numpy_module(obj.py())?
                .call_method1("asarray", (obj,))?
                .cast_into::<PyUntypedArray>()?,
        };
        let Ok(typed) = array.cast::<PyArrayDyn<bool>>() else {
            return Err(PyTypeError::new_err(format!(
                "{name} has dtype {}: masks must be bool arrays (True = may attend); pass \
                 additive float masks as bias",
                array.dtype().str()?
            )));
        };
        if array.ndim() != ndim {
            return Err(ndim_error(name, &array, ndim));
        }
        Ok(Mask {
            array: readable(typed)?,
        })
    }

    /// Borrows the 2-D mask for reading.
    pub fn matrix(&self) -> PyResult<PyReadonlyArray2<'py, bool>> {
        Ok(self
            .array
            .clone()
            .cast_into::<PyArray2<bool>>()?
            .try_readonly()?)
    }

    /// The 1-D mask as a vector.
    pub fn vector(&self) -> PyResult<Vec<bool>> {
        let array = self.array.clone().cast_into::<PyArray1<bool>>()?;
        Ok(array.try_readonly()?.as_array().to_vec())
    }
}

/// A 2-D boolean mask's nalgebra view.
pub fn mask_view<'a>(mask: &'a PyReadonlyArray2<'_, bool>) -> PyResult<MatRef<'a, bool>> {
    mask.try_as_matrix::<Dyn, Dyn, Dyn, Dyn>()
        .ok_or_else(|| PyRuntimeError::new_err("internal error: unreadable mask layout"))
}

/// A 1-D operand of dtype `T` (a log-sum-exp) as a vector; an [`AttentionError`] naming
/// `name` if it is not 1-D.
pub fn vector<T: Float>(name: &str, array: &Bound<'_, PyUntypedArray>) -> PyResult<Vec<T>> {
    if array.ndim() != 1 {
        return Err(ndim_error(name, array, 1));
    }
    let typed = readable(array.cast::<PyArrayDyn<T>>()?)?.cast_into::<PyArray1<T>>()?;
    let borrow: PyReadonlyArray1<'_, T> = typed.try_readonly()?;
    Ok(borrow.as_array().to_vec())
}

/// Outputs up to this many bytes are allocated by the numpy crate directly; larger ones
/// through `numpy.zeros`, which raises `MemoryError` where the crate would panic.
const SMALL_OUTPUT_BYTES: usize = 1 << 20;

/// A new C-ordered (row-major) `rows × cols` array of zeros of dtype `T`; the core's
/// [`CoreError::TooLarge`] message (naming `operand`) if its size overflows.
pub fn new_output<'py, T: Float>(
    py: Python<'py>,
    (rows, cols): (usize, usize),
    operand: Operand,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let bytes = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(size_of::<T>()))
        .filter(|&b| isize::try_from(b).is_ok());
    match bytes {
        None => Err(crate::core_error(CoreError::TooLarge {
            operand,
            rows,
            columns: cols,
        })),
        Some(b) if b <= SMALL_OUTPUT_BYTES => Ok(PyArray2::zeros(py, [rows, cols], false)),
        Some(_) => {
            let dtype = T::get_dtype(py);
            Ok(numpy_module(py)?
                .call_method1("zeros", ((rows, cols), dtype))?
                .cast_into::<PyArray2<T>>()?)
        }
    }
}

/// Borrows a freshly made output array for writing.
pub fn writable<'py, T: Float>(
    array: &Bound<'py, PyArray2<T>>,
) -> PyResult<PyReadwriteArray2<'py, T>> {
    Ok(array.try_readwrite()?)
}

/// The nalgebra view through which the core writes an output array in place.
pub fn output_view<'a, T: Float>(
    array: &'a mut PyReadwriteArray2<'_, T>,
) -> PyResult<MatMut<'a, T>> {
    array
        .try_as_matrix_mut::<Dyn, Dyn, Dyn, Dyn>()
        .ok_or_else(|| PyRuntimeError::new_err("internal error: unwritable output layout"))
}

/// A result computed by the core (column-major `DMatrix`) as a new C-ordered numpy array.
pub fn to_numpy<'py, T: Float>(
    py: Python<'py>,
    m: &nalgebra::DMatrix<T>,
    operand: Operand,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let array = new_output::<T>(py, m.shape(), operand)?;
    {
        let mut borrow = writable(&array)?;
        output_view(&mut borrow)?.copy_from(m);
    }
    Ok(array)
}

/// A vector result (a log-sum-exp) as a new 1-D numpy array.
pub fn vector_to_numpy<'py, T: Float>(py: Python<'py>, v: &[T]) -> Bound<'py, PyArray1<T>> {
    PyArray1::from_slice(py, v)
}
