//! `attention qkv` and `attention run` against the library: the seed example, bitwise
//! equality with direct calls for every option, and chunked runs bitwise equal to one call.

mod common;

use std::path::{Path, PathBuf};

use attention_cli::npy::NpyFloat;
use attention_core::{
    AttentionOptions, Causal, scaled_dot_product_attention, scaled_dot_product_attention_with_lse,
};
use common::{arg, fails, matrix, ok, read_f32, read_f64, write};
use nalgebra::DMatrix;

#[test]
fn the_seed_example_through_qkv_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let eye = DMatrix::<f64>::identity(2, 2);
    let x = write(d, "x.npy", &eye);
    let w = write(d, "w.npy", &eye);
    let wv = write(
        d,
        "wv.npy",
        &DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]),
    );
    let qkv = d.join("qkv");
    ok(&[
        "qkv",
        "--x",
        &arg(&x),
        "--wq",
        &arg(&w),
        "--wk",
        &arg(&w),
        "--wv",
        &arg(&wv),
        "--out-dir",
        &arg(&qkv),
    ]);
    let out = d.join("out.npy");
    ok(&[
        "run",
        "--q",
        &arg(&qkv.join("q.npy")),
        "--k",
        &arg(&qkv.join("k.npy")),
        "--v",
        &arg(&qkv.join("v.npy")),
        "--out",
        &arg(&out),
    ]);
    let got = read_f64(&out);

    let published = [[1.660_476_9, 2.660_476_9], [2.339_523_1, 3.339_523_1]];
    // The softmax by hand: scores are 1/√2 on the diagonal and 0 off it.
    let a = (1.0 / 2f64.sqrt()).exp();
    let (p, r) = (a / (a + 1.0), 1.0 / (a + 1.0)); // own key, other key
    let v = [[1.0, 2.0], [3.0, 4.0]];
    for i in 0..2 {
        for c in 0..2 {
            let by_hand = if i == 0 {
                p * v[0][c] + r * v[1][c]
            } else {
                r * v[0][c] + p * v[1][c]
            };
            assert!(
                (got[(i, c)] - published[i][c]).abs() < 1e-7,
                "({i}, {c}): {}",
                got[(i, c)]
            );
            assert!(
                (got[(i, c)] - by_hand).abs() < 1e-14,
                "({i}, {c}): {} vs {by_hand}",
                got[(i, c)]
            );
        }
    }
}

/// Inputs written to a temporary folder.
struct Case {
    dir: tempfile::TempDir,
    q: PathBuf,
    k: PathBuf,
    v: PathBuf,
}

impl Case {
    fn new<T: NpyFloat>(q: &DMatrix<T>, k: &DMatrix<T>, v: &DMatrix<T>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (q, k, v) = (
            write(dir.path(), "q.npy", q),
            write(dir.path(), "k.npy", k),
            write(dir.path(), "v.npy", v),
        );
        Case { dir, q, k, v }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `attention run` with `extra` arguments, writing `name` (and `name.lse` with `lse`).
    fn run(&self, name: &str, extra: &[String], lse: bool) -> (PathBuf, PathBuf) {
        let (out, lse_path) = (self.path(name), self.path(&format!("{name}.lse")));
        let mut args = vec![
            "run".to_string(),
            "--q".into(),
            arg(&self.q),
            "--k".into(),
            arg(&self.k),
            "--v".into(),
            arg(&self.v),
            "--out".into(),
            arg(&out),
        ];
        if lse {
            args.extend(["--lse".to_string(), arg(&lse_path)]);
        }
        args.extend(extra.iter().cloned());
        ok(&args);
        (out, lse_path)
    }
}

/// The options of a test: as command-line arguments and as the library's options.
struct Opt {
    name: &'static str,
    args: Vec<String>,
}

fn opt(name: &'static str, args: &[&str]) -> Opt {
    Opt {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// The option sets tested, with the mask and bias files (`n_q × n_kv`) they need.
fn option_sets(case: &Case, n_q: usize, n_kv: usize, f64_data: bool) -> Vec<Opt> {
    let mask = DMatrix::from_fn(n_q, n_kv, |i, j| (i * 7 + j * 3) % 5 != 0 || j == 0);
    let mask_path = case.path("mask.npy");
    write_mask(&mask_path, &mask);
    let bias = case.path("bias.npy");
    if f64_data {
        write(
            case.dir.path(),
            "bias.npy",
            &matrix::<f64>(n_q, n_kv, 0.37).map(|b| 2.0 * b),
        );
    } else {
        write(
            case.dir.path(),
            "bias.npy",
            &matrix::<f32>(n_q, n_kv, 0.37).map(|b| 2.0 * b),
        );
    }
    vec![
        opt("plain", &[]),
        opt("causal top-left", &["--causal", "top-left"]),
        opt("causal bottom-right", &["--causal", "bottom-right"]),
        opt("window", &["--window", "40,7"]),
        opt(
            "window, causal bottom-right",
            &["--window", "25,-1", "--causal", "bottom-right"],
        ),
        opt("ALiBi", &["--alibi", "0.125"]),
        opt(
            "ALiBi, causal top-left",
            &["--alibi", "0.25", "--causal", "top-left"],
        ),
        opt("softcap, scale", &["--softcap", "5", "--scale", "0.3"]),
        Opt {
            name: "mask",
            args: vec!["--mask".into(), arg(&mask_path)],
        },
        Opt {
            name: "bias",
            args: vec!["--bias".into(), arg(&bias)],
        },
    ]
}

/// Writes a bool matrix as numpy would (`|b1`, C order), independently of the crate.
fn write_mask(path: &Path, mask: &DMatrix<bool>) {
    let mut header = format!(
        "{{'descr': '|b1', 'fortran_order': False, 'shape': ({}, {}), }}",
        mask.nrows(),
        mask.ncols()
    );
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for i in 0..mask.nrows() {
        for j in 0..mask.ncols() {
            bytes.push(u8::from(mask[(i, j)]));
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// The library's options for `o`'s arguments, with the mask and bias it names.
fn library_options<'a, T: NpyFloat>(
    o: &Opt,
    mask: &'a DMatrix<bool>,
    bias: &'a DMatrix<T>,
) -> AttentionOptions<'a, T> {
    let mut options = AttentionOptions::new();
    let mut it = o.args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap();
        let number = || value.parse::<T>().ok().unwrap();
        options = match flag.as_str() {
            "--causal" if value == "top-left" => options.with_causal(Causal::TopLeft),
            "--causal" => options.with_causal(Causal::BottomRight),
            "--window" => {
                let (l, r) = value.split_once(',').unwrap();
                let side = |s: &str| {
                    if s == "-1" {
                        usize::MAX
                    } else {
                        s.parse().unwrap()
                    }
                };
                options.with_window(side(l), side(r))
            }
            "--alibi" => options.with_alibi_slope(number()),
            "--softcap" => options.with_softcap(number()),
            "--scale" => options.with_scale(number()),
            "--mask" => options.with_mask(mask),
            "--bias" => options.with_bias(bias),
            other => panic!("{other}"),
        };
    }
    options
}

/// `run` equals the library's own call bit for bit (output and log-sum-exp).
fn matches_library<T: NpyFloat>(read: fn(&Path) -> DMatrix<T>) {
    let (n_q, n_kv, d_k, d_v) = (40, 50, 16, 12);
    let (q, k, v) = (
        matrix::<T>(n_q, d_k, 0.71),
        matrix::<T>(n_kv, d_k, 0.53),
        matrix::<T>(n_kv, d_v, 0.29),
    );
    let case = Case::new(&q, &k, &v);
    let f64_data = T::NAME == "float64";
    let mask = DMatrix::from_fn(n_q, n_kv, |i, j| (i * 7 + j * 3) % 5 != 0 || j == 0);
    let bias = matrix::<T>(n_q, n_kv, 0.37).map(|b| b + b);
    for o in option_sets(&case, n_q, n_kv, f64_data) {
        let options = library_options(&o, &mask, &bias);
        let (want, want_lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &options).unwrap();
        assert_eq!(
            scaled_dot_product_attention(&q, &k, &v, &options).unwrap(),
            want
        );
        let (out, lse) = case.run("out.npy", &o.args, true);
        let (got, got_lse) = (read(&out), read_lse::<T>(&lse));
        let bits = |m: &DMatrix<T>| m.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{}: output", o.name);
        let want_lse: Vec<u64> = want_lse.iter().map(|x| x.to_f64().to_bits()).collect();
        assert_eq!(got_lse, want_lse, "{}: log-sum-exp", o.name);
    }
}

/// The 1-D lse file's values (widened to f64 bits), read by its raw little-endian bytes.
fn read_lse<T: NpyFloat>(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(
        header.contains("'shape': (") && !header.contains(", 1"),
        "1-D: {header}"
    );
    let data = &bytes[10 + len..];
    if T::NAME == "float64" {
        data.chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()).to_bits())
            .collect()
    } else {
        data.chunks(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())).to_bits())
            .collect()
    }
}

#[test]
fn run_equals_the_library_call_bitwise_f64() {
    matches_library::<f64>(read_f64);
}

#[test]
fn run_equals_the_library_call_bitwise_f32() {
    matches_library::<f32>(read_f32);
}

/// Chunks of 64 rows against one call: the same bytes in the output and lse files.
fn chunked_equals_whole<T: NpyFloat>() {
    let f64_data = T::NAME == "float64";
    for (n_q, n_kv, d) in [(130, 150, 16), (200, 280, 64), (300, 170, 32)] {
        let (q, k, v) = (
            matrix::<T>(n_q, d, 0.71),
            matrix::<T>(n_kv, d, 0.53),
            matrix::<T>(n_kv, d, 0.29),
        );
        let case = Case::new(&q, &k, &v);
        for o in option_sets(&case, n_q, n_kv, f64_data) {
            let lse = matches!(o.name, "plain" | "causal bottom-right" | "bias");
            let (whole, whole_lse) = case.run("whole.npy", &o.args, lse);
            let mut chunked_args = o.args.clone();
            chunked_args.extend(["--chunk-rows".to_string(), "64".to_string()]);
            let (chunked, chunked_lse) = case.run("chunked.npy", &chunked_args, lse);
            let what = format!("{} {n_q} × {n_kv}, {}", T::NAME, o.name);
            assert!(
                std::fs::read(&whole).unwrap() == std::fs::read(&chunked).unwrap(),
                "{what}: output"
            );
            if lse {
                assert!(
                    std::fs::read(&whole_lse).unwrap() == std::fs::read(&chunked_lse).unwrap(),
                    "{what}: lse"
                );
            }
        }
    }
}

#[test]
fn chunked_run_equals_one_call_bitwise_f64() {
    chunked_equals_whole::<f64>();
}

#[test]
fn chunked_run_equals_one_call_bitwise_f32() {
    chunked_equals_whole::<f32>();
}

#[test]
fn threads_do_not_change_the_bits() {
    let (q, k, v) = (
        matrix::<f32>(300, 32, 0.71),
        matrix::<f32>(260, 32, 0.53),
        matrix::<f32>(260, 32, 0.29),
    );
    let case = Case::new(&q, &k, &v);
    let args = |t: &str| {
        vec![
            "--causal".to_string(),
            "top-left".into(),
            "--threads".into(),
            t.into(),
            "--chunk-rows".into(),
            "64".into(),
        ]
    };
    let (one, _) = case.run("one.npy", &args("1"), false);
    let (three, _) = case.run("three.npy", &args("3"), false);
    assert!(std::fs::read(one).unwrap() == std::fs::read(three).unwrap());
}

#[test]
fn chunked_errors_count_rows_in_the_whole_matrix() {
    let mut q = matrix::<f64>(200, 16, 0.71);
    q[(150, 3)] = f64::INFINITY;
    let (k, v) = (matrix::<f64>(100, 16, 0.53), matrix::<f64>(100, 8, 0.29));
    let case = Case::new(&q, &k, &v);
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "run",
            "--q",
            &arg(&case.q),
            "--k",
            &arg(&case.k),
            "--v",
            &arg(&case.v),
            "--out",
            &arg(&case.path("o.npy")),
            "--chunk-rows",
            "64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    assert!(fails(&base(&[])).contains("query[150, 3] is +inf"));

    // A bias entry of +inf (−inf masks; +inf is an error) in the third chunk.
    let mut bias = DMatrix::<f64>::zeros(200, 100);
    bias[(140, 5)] = f64::INFINITY;
    let bias = write(case.dir.path(), "bias.npy", &bias);
    let q_ok = write(case.dir.path(), "q_ok.npy", &matrix::<f64>(200, 16, 0.71));
    let mut args = base(&["--bias", &arg(&bias)]);
    args[2] = arg(&q_ok);
    let stderr = fails(&args);
    assert!(stderr.contains("bias[140, 5] is +inf"), "{stderr}");

    // A mask with the wrong number of rows: the core's message with the real sizes.
    let mask = case.path("mask.npy");
    write_mask(&mask, &DMatrix::from_element(10, 100, true));
    let mut args = base(&["--mask", &arg(&mask)]);
    args[2] = arg(&q_ok);
    let stderr = fails(&args);
    assert!(
        stderr.contains("mask has 10 rows but query has 200"),
        "{stderr}"
    );
}
