//! The keyword options of the Python functions → [`AttentionOptions`].
//!
//! Two steps, because masks and biases are borrowed from numpy: [`OptionArgs::parse`]
//! checks what does not depend on the dtype (causal, window, mask dtypes); after the
//! dtype is known, [`OptionArgs::typed`] borrows the arrays ([`TypedOptions`]),
//! [`TypedOptions::views`] makes their nalgebra views ([`OptionViews`]) and
//! [`OptionViews::options`] the core's options over them.

use attention_core::{AttentionOptions, Causal, MatRef, Parallelism};
use numpy::{PyReadonlyArray2, PyUntypedArray};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::AttentionError;
use crate::convert::{Float, Input, Mask, mask_view};

/// The options of a call as Python gave them, checked where the dtype does not matter.
pub struct OptionArgs<'py> {
    /// `scale`.
    pub scale: Option<f64>,
    /// `causal`, parsed.
    pub causal: Option<Causal>,
    /// `window`, with `None` sides as `usize::MAX`.
    pub window: Option<(usize, usize)>,
    /// `softcap`.
    pub softcap: Option<f64>,
    /// `alibi_slope`.
    pub alibi_slope: Option<f64>,
    /// `alibi_slopes` (one per query head, multi-head calls).
    pub alibi_slopes: Option<Vec<f64>>,
    /// `(dropout_p, dropout_seed)`, when `dropout_p != 0`.
    pub dropout: Option<(f64, u64)>,
    /// `mask` (2-D bool).
    pub mask: Option<Mask<'py>>,
    /// `key_mask` (1-D bool).
    pub key_mask: Option<Vec<bool>>,
    /// `masks`: one 2-D bool mask per sequence.
    pub masks: Vec<Mask<'py>>,
    /// `bias` and `biases` (one per sequence), converted to float arrays, with their
    /// names: they take part in the call's dtype check like the data operands.
    pub biases: Vec<(String, Bound<'py, PyAny>)>,
    /// Whether `bias` was given (it is then `biases[0]`), rather than `biases`.
    pub single_bias: bool,
}

/// The keyword options as the Python functions receive them.
#[derive(Default)]
pub struct RawOptions<'a, 'py> {
    /// `scale=`.
    pub scale: Option<f64>,
    /// `mask=`.
    pub mask: Option<&'a Bound<'py, PyAny>>,
    /// `key_mask=`.
    pub key_mask: Option<&'a Bound<'py, PyAny>>,
    /// `bias=`.
    pub bias: Option<&'a Bound<'py, PyAny>>,
    /// `causal=`.
    pub causal: Option<&'a str>,
    /// `window=`.
    pub window: Option<&'a Bound<'py, PyAny>>,
    /// `softcap=`.
    pub softcap: Option<f64>,
    /// `alibi_slope=`.
    pub alibi_slope: Option<f64>,
    /// `alibi_slopes=`.
    pub alibi_slopes: Option<Vec<f64>>,
    /// `dropout_p=`.
    pub dropout_p: f64,
    /// `dropout_seed=`.
    pub dropout_seed: u64,
    /// `masks=`.
    pub masks: Option<Vec<Bound<'py, PyAny>>>,
    /// `biases=`.
    pub biases: Option<Vec<Bound<'py, PyAny>>>,
}

/// `"top_left"` / `"bottom_right"` → [`Causal`].
fn parse_causal(causal: &str) -> PyResult<Causal> {
    match causal {
        "top_left" => Ok(Causal::TopLeft),
        "bottom_right" => Ok(Causal::BottomRight),
        other => Err(AttentionError::new_err(format!(
            "causal must be None, 'top_left' or 'bottom_right', not {other:?}"
        ))),
    }
}

/// `(left, right)`, each an int ≥ 0 or `None` (unbounded) → the core's window.
fn parse_window(window: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let Ok((left, right)) =
        window.extract::<(Option<Bound<'_, PyAny>>, Option<Bound<'_, PyAny>>)>()
    else {
        return Err(PyTypeError::new_err(
            "window must be a pair (left, right) of ints >= 0 or None (unbounded)",
        ));
    };
    let side = |s: Option<Bound<'_, PyAny>>, name: &str| -> PyResult<usize> {
        let Some(s) = s else {
            return Ok(usize::MAX);
        };
        let Ok(n) = s.extract::<i128>() else {
            return Err(PyTypeError::new_err(format!(
                "window's {name} side must be an int >= 0 or None (unbounded)"
            )));
        };
        usize::try_from(n).map_err(|_| {
            AttentionError::new_err(format!("window's {name} side is {n}: it must be >= 0"))
        })
    };
    Ok((side(left, "left")?, side(right, "right")?))
}

impl<'py> OptionArgs<'py> {
    /// Checks the options that do not depend on the dtype.
    pub fn parse(raw: RawOptions<'_, 'py>) -> PyResult<Self> {
        let causal = raw.causal.map(parse_causal).transpose()?;
        let window = raw.window.map(parse_window).transpose()?;
        let mask = raw.mask.map(|m| Mask::new("mask", m, 2)).transpose()?;
        let key_mask = raw
            .key_mask
            .map(|m| Mask::new("key_mask", m, 1)?.vector())
            .transpose()?;
        let masks = raw
            .masks
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(s, m)| Mask::new(&format!("masks[{s}]"), m, 2))
            .collect::<PyResult<Vec<_>>>()?;
        let single_bias = raw.bias.is_some();
        let mut biases: Vec<(String, Bound<'py, PyAny>)> = raw
            .bias
            .map(|b| ("bias".to_string(), b.clone()))
            .into_iter()
            .collect();
        for (s, b) in raw.biases.unwrap_or_default().into_iter().enumerate() {
            biases.push((format!("biases[{s}]"), b));
        }
        if single_bias && biases.len() > 1 {
            return Err(AttentionError::new_err(
                "pass either bias (one sequence) or biases (one per sequence), not both",
            ));
        }
        Ok(OptionArgs {
            scale: raw.scale,
            causal,
            window,
            softcap: raw.softcap,
            alibi_slope: raw.alibi_slope,
            alibi_slopes: raw.alibi_slopes,
            dropout: (raw.dropout_p != 0.0).then_some((raw.dropout_p, raw.dropout_seed)),
            mask,
            key_mask,
            masks,
            biases,
            single_bias,
        })
    }

    /// Borrows the masks and the (converted) biases for a call in `T`; `biases` are the
    /// bias arrays converted by [`float_array`](crate::convert::float_array), in the order of
    /// `self.biases`.
    pub fn typed<T: Float>(
        &self,
        biases: &[Bound<'py, PyUntypedArray>],
    ) -> PyResult<TypedOptions<'py, T>> {
        let mut inputs = Vec::with_capacity(biases.len());
        for ((name, _), array) in self.biases.iter().zip(biases) {
            inputs.push(Input::<T>::new(name, array)?);
        }
        Ok(TypedOptions {
            mask: self.mask.as_ref().map(Mask::matrix).transpose()?,
            masks: self
                .masks
                .iter()
                .map(Mask::matrix)
                .collect::<PyResult<_>>()?,
            biases: inputs,
            single_bias: self.single_bias,
            scale: self.scale.map(T::from_f64_rounded),
            causal: self.causal,
            window: self.window,
            softcap: self.softcap.map(T::from_f64_rounded),
            alibi_slope: self.alibi_slope.map(T::from_f64_rounded),
            alibi_slopes: self
                .alibi_slopes
                .as_ref()
                .map(|s| s.iter().copied().map(T::from_f64_rounded).collect()),
            dropout: self.dropout,
            key_mask: self.key_mask.clone(),
        })
    }
}

/// The options of a call in `T`, their arrays borrowed from numpy.
pub struct TypedOptions<'py, T: Float> {
    mask: Option<PyReadonlyArray2<'py, bool>>,
    masks: Vec<PyReadonlyArray2<'py, bool>>,
    biases: Vec<Input<'py, T>>,
    single_bias: bool,
    scale: Option<T>,
    causal: Option<Causal>,
    window: Option<(usize, usize)>,
    softcap: Option<T>,
    alibi_slope: Option<T>,
    alibi_slopes: Option<Vec<T>>,
    dropout: Option<(f64, u64)>,
    key_mask: Option<Vec<bool>>,
}

/// The nalgebra views of a call's masks and biases and its numbers in `T`: what
/// [`AttentionOptions`] borrows (all `Sync`, so that a call can run on other threads).
pub struct OptionViews<'a, T: Float> {
    scale: Option<T>,
    causal: Option<Causal>,
    window: Option<(usize, usize)>,
    softcap: Option<T>,
    alibi_slope: Option<T>,
    alibi_slopes: Option<&'a [T]>,
    dropout: Option<(f64, u64)>,
    key_mask: Option<&'a [bool]>,
    mask: Option<MatRef<'a, bool>>,
    masks: Vec<MatRef<'a, bool>>,
    bias: Option<MatRef<'a, T>>,
    biases: Vec<MatRef<'a, T>>,
}

impl<T: Float> TypedOptions<'_, T> {
    /// The views of the borrowed arrays.
    pub fn views(&self) -> PyResult<OptionViews<'_, T>> {
        let mut biases = self
            .biases
            .iter()
            .map(Input::view)
            .collect::<PyResult<Vec<_>>>()?;
        let bias = if self.single_bias && !biases.is_empty() {
            Some(biases.remove(0))
        } else {
            None
        };
        Ok(OptionViews {
            scale: self.scale,
            causal: self.causal,
            window: self.window,
            softcap: self.softcap,
            alibi_slope: self.alibi_slope,
            alibi_slopes: self.alibi_slopes.as_deref(),
            dropout: self.dropout,
            key_mask: self.key_mask.as_deref(),
            mask: self.mask.as_ref().map(mask_view).transpose()?,
            masks: self.masks.iter().map(mask_view).collect::<PyResult<_>>()?,
            bias,
            biases,
        })
    }
}

impl<T: Float> OptionViews<'_, T> {
    /// The core's options.
    pub fn options(&self, parallelism: Parallelism) -> AttentionOptions<'_, T> {
        let mut o = AttentionOptions::new().with_parallelism(parallelism);
        if let Some(s) = self.scale {
            o = o.with_scale(s);
        }
        if let Some(c) = self.causal {
            o = o.with_causal(c);
        }
        if let Some((left, right)) = self.window {
            o = o.with_window(left, right);
        }
        if let Some(c) = self.softcap {
            o = o.with_softcap(c);
        }
        if let Some(m) = self.alibi_slope {
            o = o.with_alibi_slope(m);
        }
        if let Some(slopes) = self.alibi_slopes {
            o = o.with_alibi_slopes(slopes);
        }
        if let Some((p, seed)) = self.dropout {
            o = o.with_dropout(p, seed);
        }
        if let Some(km) = self.key_mask {
            o = o.with_key_mask(km);
        }
        if let Some(m) = self.mask {
            o = o.with_mask(m);
        }
        if let Some(b) = self.bias {
            o = o.with_bias(b);
        }
        if !self.masks.is_empty() {
            o = o.with_sequence_masks(&self.masks);
        }
        if !self.biases.is_empty() {
            o = o.with_sequence_biases(&self.biases);
        }
        o
    }
}
