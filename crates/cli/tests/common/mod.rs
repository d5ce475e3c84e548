//! Helpers shared by the integration tests: running the `attention` binary and writing
//! its input files.

#![allow(dead_code)] // each test file uses some of these

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attention_cli::npy::{self, FloatMatrix, NpyFloat};
use nalgebra::DMatrix;

/// The folder of files numpy wrote (`tests/data/make.py`).
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Runs `attention args…`.
pub fn attention<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attention"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs `attention args…` and checks it succeeded; returns its stdout.
pub fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = attention(args);
    assert!(
        out.status.success(),
        "attention failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs `attention args…`, checks that it failed cleanly (status 1 or 2, no panic, one
/// `error:` message) and returns stderr.
pub fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = attention(args);
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 errors");
    let code = out.status.code();
    assert!(
        code == Some(1) || code == Some(2),
        "expected a clean failure, got {code:?}: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Writes `m` to `dir/name` and returns the path.
pub fn write<T: NpyFloat>(dir: &Path, name: &str, m: &DMatrix<T>) -> PathBuf {
    let path = dir.join(name);
    npy::write_matrix(&path, m).expect("writes");
    path
}

/// Reads a float64 matrix the command wrote.
pub fn read_f64(path: &Path) -> DMatrix<f64> {
    match npy::read_float_matrix(path).expect("reads") {
        FloatMatrix::F64(m) => m,
        other => panic!(
            "{}: expected float64, found {}",
            path.display(),
            other.dtype_name()
        ),
    }
}

/// Reads a float32 matrix the command wrote.
pub fn read_f32(path: &Path) -> DMatrix<f32> {
    match npy::read_float_matrix(path).expect("reads") {
        FloatMatrix::F32(m) => m,
        other => panic!(
            "{}: expected float32, found {}",
            path.display(),
            other.dtype_name()
        ),
    }
}

/// Deterministic test values in about [-1, 1]: `sin(s·(i·cols + j) + 0.3)`.
pub fn matrix<T: NpyFloat>(rows: usize, cols: usize, s: f64) -> DMatrix<T> {
    DMatrix::from_fn(rows, cols, |i, j| {
        T::from_f64_rounded((s * (i * cols + j) as f64 + 0.3).sin())
    })
}

/// A path as a string argument.
pub fn arg(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}
