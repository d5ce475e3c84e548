//! `.npy` files numpy wrote (`tests/data/make.py`) read through the `attention` command,
//! its output format, and every error path of reading files and options.

mod common;

use std::path::Path;

use common::{arg, data, fails, ok, write};
use nalgebra::DMatrix;

/// `f(i, j)` of make.py.
fn f(i: usize, j: usize) -> f64 {
    (i * 10 + j) as f64 + 0.25
}

/// `g(i, j)` of make.py.
fn g(i: usize, j: usize) -> f64 {
    ((i + 2 * j) as f64).sin()
}

/// An output file parsed here, independently of the crate's reader: its header text and
/// its data as little-endian values of `item` bytes.
struct Parsed {
    header: String,
    data: Vec<u8>,
}

fn parse(path: &Path) -> Parsed {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
    };
    assert!(
        (start + len).is_multiple_of(64),
        "the data is 64-byte aligned"
    );
    Parsed {
        header: String::from_utf8(bytes[start..start + len].to_vec()).unwrap(),
        data: bytes[start + len..].to_vec(),
    }
}

impl Parsed {
    /// The `'shape'` entry as numbers (npyz writes `(3, 4, )`, numpy `(3, 4)`).
    fn shape(&self) -> Vec<usize> {
        let start = self.header.find("'shape': (").expect("a shape") + "'shape': (".len();
        let end = start
            + self.header[start..]
                .find(')')
                .expect("a closing parenthesis");
        self.header[start..end]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect()
    }
    fn f64s(&self) -> Vec<f64> {
        self.data
            .chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn f32s(&self) -> Vec<f32> {
        self.data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// Passes `file` through `attention qkv` with identity weights of `dtype` (X·I = X
/// exactly) and returns the written q.npy, parsed.
fn through_cli(file: &Path, cols: usize, f32_data: bool) -> Parsed {
    let dir = tempfile::tempdir().unwrap();
    let eye = if f32_data {
        write(dir.path(), "eye.npy", &DMatrix::<f32>::identity(cols, cols))
    } else {
        write(dir.path(), "eye.npy", &DMatrix::<f64>::identity(cols, cols))
    };
    let out = dir.path().join("out");
    ok(&[
        "qkv",
        "--x",
        &arg(file),
        "--wq",
        &arg(&eye),
        "--wk",
        &arg(&eye),
        "--wv",
        &arg(&eye),
        "--out-dir",
        &arg(&out),
    ]);
    parse(&out.join("q.npy"))
}

#[test]
fn float32_c_order_reads_and_writes_little_endian_c_order() {
    let p = through_cli(&data("f32_c.npy"), 4, true);
    assert!(p.header.contains("'descr': '<f4'"), "{}", p.header);
    assert!(p.header.contains("'fortran_order': False"), "{}", p.header);
    assert_eq!(p.shape(), [3, 4]);
    let expected: Vec<f32> = (0..3)
        .flat_map(|i| (0..4).map(move |j| f(i, j) as f32))
        .collect();
    assert_eq!(p.f32s(), expected);
}

#[test]
fn float64_fortran_order_is_read_by_columns() {
    let p = through_cli(&data("f64_fortran.npy"), 5, false);
    assert!(p.header.contains("'descr': '<f8'"), "{}", p.header);
    assert_eq!(p.shape(), [4, 5]);
    let values = p.f64s();
    for i in 0..4 {
        for j in 0..5 {
            let v = values[i * 5 + j];
            assert!(
                (v - g(i, j)).abs() <= 1e-15,
                "({i}, {j}): {v} vs {}",
                g(i, j)
            );
        }
    }
}

#[test]
fn big_endian_float64_gives_the_same_values() {
    let big = through_cli(&data("f64_big.npy"), 5, false);
    let little = through_cli(&data("f64_fortran.npy"), 5, false);
    assert!(big.header.contains("'descr': '<f8'"), "{}", big.header);
    assert_eq!(big.data, little.data);
}

#[test]
fn big_endian_fortran_float32_gives_the_same_values() {
    let big = through_cli(&data("f32_big_fortran.npy"), 4, true);
    let little = through_cli(&data("f32_c.npy"), 4, true);
    assert!(big.header.contains("'descr': '<f4'"), "{}", big.header);
    assert_eq!(big.data, little.data);
}

#[test]
fn the_bool_mask_selects_keys_row_by_row() {
    // Zero queries and keys: each output is the mean of the allowed values.
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "q.npy", &DMatrix::<f64>::zeros(3, 2));
    let k = write(dir.path(), "k.npy", &DMatrix::<f64>::zeros(5, 2));
    let values = [1.0, 10.0, 100.0, 1000.0, 10000.0];
    let v = write(
        dir.path(),
        "v.npy",
        &DMatrix::from_column_slice(5, 1, &values),
    );
    let out = dir.path().join("out.npy");
    ok(&[
        "run",
        "--q",
        &arg(&q),
        "--k",
        &arg(&k),
        "--v",
        &arg(&v),
        "--mask",
        &arg(&data("mask.npy")),
        "--out",
        &arg(&out),
    ]);
    let got = parse(&out).f64s();
    for (i, got) in got.iter().enumerate() {
        let allowed: Vec<f64> = (0..5)
            .filter(|j| (i + j) % 3 != 0)
            .map(|j| values[j])
            .collect();
        let mean = allowed.iter().sum::<f64>() / allowed.len() as f64;
        assert!(
            (got - mean).abs() <= 1e-12 * mean,
            "row {i}: {got} vs {mean}"
        );
    }
}

#[test]
fn run_on_numpy_files_matches_the_softmax_formula() {
    // Q = V = f32_c (3 × 4), K = the big-endian Fortran copy of the same values.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    let (q, k) = (data("f32_c.npy"), data("f32_big_fortran.npy"));
    ok(&[
        "run",
        "--q",
        &arg(&q),
        "--k",
        &arg(&k),
        "--v",
        &arg(&q),
        "--scale",
        "0.002",
        "--out",
        &arg(&out),
    ]);
    let p = parse(&out);
    assert!(p.header.contains("'descr': '<f4'"), "{}", p.header);
    assert_eq!(p.shape(), [3, 4]);
    let got = p.f32s();
    for i in 0..3 {
        let scores: Vec<f64> = (0..3)
            .map(|j| 0.002 * (0..4).map(|c| f(i, c) * f(j, c)).sum::<f64>())
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for c in 0..4 {
            let want: f64 = (0..3).map(|j| e[j] / sum * f(j, c)).sum();
            let got = f64::from(got[i * 4 + c]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "({i}, {c}): {got} vs {want}"
            );
        }
    }
}

/// `attention run` with `q` (and the numpy files for k and v) must fail with a message
/// containing each of `expected`.
fn run_fails(q: &Path, extra: &[&str], expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    let mut args = vec![
        "run".to_string(),
        "--q".into(),
        arg(q),
        "--k".into(),
        arg(&data("f32_c.npy")),
        "--v".into(),
        arg(&data("f32_c.npy")),
        "--out".into(),
        arg(&out),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let stderr = fails(&args);
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
    }
    assert!(!out.exists(), "no output after an error");
}

#[test]
fn a_missing_file_is_named() {
    run_fails(
        Path::new("no/such/q.npy"),
        &[],
        &["no/such/q.npy: no such file"],
    );
}

#[test]
fn malformed_and_truncated_files_are_named() {
    run_fails(
        &data("garbage.npy"),
        &[],
        &["garbage.npy: not a valid .npy file"],
    );
    run_fails(
        &data("truncated.npy"),
        &[],
        &["truncated.npy: not a valid .npy file", "12 values"],
    );
}

#[test]
fn unsupported_dtypes_are_named_with_their_file() {
    run_fails(
        &data("int64.npy"),
        &[],
        &["int64.npy: unsupported dtype int64 ('<i8')"],
    );
    run_fails(
        &data("float16.npy"),
        &[],
        &["float16.npy: unsupported dtype float16 ('<f2')"],
    );
}

#[test]
fn arrays_that_are_not_2d_are_rejected() {
    run_fails(
        &data("one_d.npy"),
        &[],
        &["one_d.npy: expected a 2-D array", "(4,)"],
    );
    run_fails(
        &data("three_d.npy"),
        &[],
        &["three_d.npy: expected a 2-D array", "(2, 3, 4)"],
    );
}

#[test]
fn shape_mismatches_give_the_cores_message() {
    // Q has 5 columns, K 4.
    run_fails(&data("f64_big.npy"), &[], &["float64"]); // mixed dtypes first
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "q.npy", &DMatrix::<f32>::zeros(3, 5));
    run_fails(
        &q,
        &[],
        &["error: key has 4 columns but query has 5 (d_k must match)"],
    );
}

#[test]
fn mixed_dtypes_name_the_files() {
    run_fails(
        &data("f64_big.npy"),
        &[],
        &[
            "same float dtype",
            "f64_big.npy is float64",
            "f32_c.npy is float32",
        ],
    );
    // The bias must have the data's dtype.
    let dir = tempfile::tempdir().unwrap();
    let bias = write(dir.path(), "bias64.npy", &DMatrix::<f64>::zeros(3, 3));
    run_fails(
        &data("f32_c.npy"),
        &["--bias", &arg(&bias)],
        &["bias64.npy is float64"],
    );
}

#[test]
fn a_mask_must_be_bool_and_the_right_size() {
    run_fails(
        &data("f32_c.npy"),
        &["--mask", &arg(&data("f32_c.npy"))],
        &["f32_c.npy: a mask must be a bool array, found dtype float32"],
    );
    // mask.npy is 3 × 5; there are 3 keys.
    run_fails(
        &data("f32_c.npy"),
        &["--mask", &arg(&data("mask.npy"))],
        &["mask has 5 columns but key has 3"],
    );
    run_fails(
        &data("f32_c.npy"),
        &["--mask", &arg(&data("int64.npy"))],
        &["int64.npy: unsupported dtype int64"],
    );
}

#[test]
fn non_finite_inputs_give_the_cores_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = DMatrix::<f32>::zeros(3, 4);
    q[(1, 2)] = f32::NAN;
    let q = write(dir.path(), "q.npy", &q);
    run_fails(
        &q,
        &[],
        &["error: query[1, 2] is NaN: inputs must be finite"],
    );
}

#[test]
fn bad_option_values_are_rejected() {
    let q = data("f32_c.npy");
    run_fails(
        &q,
        &["--causal", "diagonal"],
        &["--causal: expected top-left or bottom-right, found 'diagonal'"],
    );
    run_fails(
        &q,
        &["--scale", "abc"],
        &["--scale: expected a number, found 'abc'"],
    );
    run_fails(&q, &["--alibi", "x"], &["--alibi: expected a number"]);
    run_fails(&q, &["--window", "3"], &["--window: expected L,R"]);
    run_fails(&q, &["--window", "3,-2"], &["--window: expected L,R"]);
    run_fails(
        &q,
        &["--threads", "0"],
        &["--threads: expected a whole number"],
    );
    run_fails(
        &q,
        &["--chunk-rows", "100"],
        &["--chunk-rows: expected a multiple of 64"],
    );
    run_fails(
        &q,
        &["--softcap", "-1"],
        &["softcap is -1: it must be finite and > 0"],
    );
    run_fails(
        &q,
        &["--scale", "inf"],
        &["scale is inf: it must be finite"],
    );
    run_fails(&q, &["--frobnicate"], &["invalid option '--frobnicate'"]);
    run_fails(&q, &["--scale"], &["missing argument for option '--scale'"]);
}

#[test]
fn command_line_mistakes_are_reported() {
    assert!(fails::<&str>(&[]).contains("no command given"));
    assert!(fails(&["transform"]).contains("unknown command 'transform'"));
    assert!(
        fails(&["run", "--q", "a.npy", "--k", "b.npy", "--v", "c.npy"])
            .contains("run: missing --out")
    );
    assert!(
        fails(&["heatmap", "--q", "a.npy", "--k", "b.npy", "--png", "w.png"])
            .contains("heatmap: missing --v")
    );
    assert!(fails(&["qkv", "--x", "a.npy"]).contains("qkv: missing --wq"));
}

#[test]
fn an_unwritable_output_is_named() {
    let q = arg(&data("f32_c.npy"));
    let stderr = fails(&[
        "run",
        "--q",
        &q,
        "--k",
        &q,
        "--v",
        &q,
        "--out",
        "/nonexistent/dir/out.npy",
    ]);
    assert!(
        stderr.contains("cannot write /nonexistent/dir/out.npy"),
        "{stderr}"
    );
}

#[test]
fn help_has_examples_for_every_command() {
    let top = ok(&["--help"]);
    assert!(
        top.contains("attention run")
            && top.contains("attention heatmap")
            && top.contains("attention qkv")
    );
    for command in ["qkv", "run", "heatmap"] {
        let text = ok(&[command, "--help"]);
        assert!(text.contains("Example"), "{command}: {text}");
        assert!(!text.contains("ATTENTION_OPTIONS") && !text.contains("DOWNSAMPLE_RULE"));
    }
    assert!(ok(&["heatmap", "--help"]).contains("⌈n_q/512⌉ × ⌈n_kv/512⌉"));
    assert!(ok(&["run", "--help"]).contains("--causal top-left|bottom-right"));
}

/// An `.npy` version 1.0 file with this header dictionary and no data.
fn header_only(dir: &Path, name: &str, dict: &str) -> std::path::PathBuf {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn absurd_headers_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let overflow = header_only(
        d,
        "huge.npy",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
    );
    run_fails(
        &overflow,
        &[],
        &["huge.npy: not a valid .npy file", "too many elements"],
    );
    let wraps = header_only(
        d,
        "wraps.npy",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
    );
    run_fails(&wraps, &[], &["wraps.npy: not a valid .npy file"]);
    let large = header_only(
        d,
        "large.npy",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000, 1000000), }",
    );
    run_fails(
        &large,
        &[],
        &["large.npy: not a valid .npy file", "0 bytes of data follow"],
    );
    let negative = header_only(
        d,
        "negative.npy",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (-1, 2), }",
    );
    run_fails(&negative, &[], &["negative.npy: not a valid .npy file"]);
    let record = header_only(
        d,
        "record.npy",
        "{'descr': [('a', '<f8'), ('b', '<i4')], 'fortran_order': False, 'shape': (0, 2), }",
    );
    run_fails(
        &record,
        &[],
        &["record.npy: unsupported dtype structured (record)"],
    );
}
