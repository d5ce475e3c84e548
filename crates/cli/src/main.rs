//! The `attention` command: scaled dot-product attention on `.npy` files.
//!
//! `attention qkv` projects tokens to Q, K and V; `attention run` computes attention and
//! writes the output (and optionally the log-sum-exp); `attention heatmap` draws the
//! attention weights as a PNG. `attention --help` and `attention <command> --help` say
//! more. Errors are printed as `error: <message>` with exit status 1 (2 for a bad command
//! line); nothing panics on bad input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use attention_cli::compute::{self, CHUNK_ALIGN, DEFAULT_CHUNK_ROWS, Inputs, OptionArgs};
use attention_cli::npy::{self, FloatMatrix, NpyFloat};
use attention_cli::{Error, Result, heatmap};
use attention_core::{Causal, attention_weights, compute_qkv};
use lexopt::prelude::*;
use nalgebra::DMatrix;

/// `attention --help`.
const HELP: &str = "\
attention: exact scaled dot-product attention, softmax(Q·Kᵀ·scale)·V, on .npy files

Usage:
  attention qkv     --x X.npy --wq WQ.npy --wk WK.npy --wv WV.npy --out-dir DIR
  attention run     --q Q.npy --k K.npy --v V.npy --out OUT.npy [options]
  attention heatmap --q Q.npy --k K.npy --v V.npy --png WEIGHTS.png [options]

Commands:
  qkv      Q = X·W_q, K = X·W_k, V = X·W_v, written to DIR/q.npy, k.npy, v.npy
  run      attention; writes the n_q × d_v output (and the log-sum-exp with --lse)
  heatmap  the n_q × n_kv attention weights as a PNG image

Matrices are 2-D float32 or float64 .npy files (C or Fortran order, either byte order),
one row per token; all of a command's float files must have the same dtype, which the
results keep. Run `attention <command> --help` for a command's options and examples.
";

/// `attention qkv --help`.
const QKV_HELP: &str = "\
attention qkv: project tokens to queries, keys and values

Usage:
  attention qkv --x X.npy --wq WQ.npy --wk WK.npy --wv WV.npy --out-dir DIR

  --x X.npy        the tokens, n × d_model
  --wq WQ.npy      W_q, d_model × d_k
  --wk WK.npy      W_k, d_model × d_k
  --wv WV.npy      W_v, d_model × d_v
  --out-dir DIR    where q.npy (n × d_k), k.npy (n × d_k) and v.npy (n × d_v) go
                   (created if missing)

Example:
  attention qkv --x x.npy --wq wq.npy --wk wk.npy --wv wv.npy --out-dir qkv
  attention run --q qkv/q.npy --k qkv/k.npy --v qkv/v.npy --out out.npy
";

/// `attention run --help` (`ATTENTION_OPTIONS` is replaced by [`OPTIONS_HELP`]).
const RUN_HELP: &str = "\
attention run: scaled dot-product attention

Usage:
  attention run --q Q.npy --k K.npy --v V.npy --out OUT.npy [options]

  --q Q.npy        queries, n_q × d_k
  --k K.npy        keys, n_kv × d_k
  --v V.npy        values, n_kv × d_v
  --out OUT.npy    the output, n_q × d_v (little-endian, C order, the inputs' dtype)
  --lse LSE.npy    also write each query's log-sum-exp (1-D, n_q; -inf for a query
                   that may attend to no key)
  --threads N      compute on N threads (the result is the same for any N)
ATTENTION_OPTIONS
A long run reports its progress on stderr when stderr is a terminal.

Examples:
  attention run --q q.npy --k k.npy --v v.npy --out out.npy
  attention run --q q.npy --k k.npy --v v.npy --out out.npy --causal bottom-right \\
      --window 128,0 --lse lse.npy --threads 4
";

/// `attention heatmap --help` (with [`OPTIONS_HELP`] and the downsampling rule).
const HEATMAP_HELP: &str = "\
attention heatmap: draw the attention weights softmax(s) as a PNG

Usage:
  attention heatmap --q Q.npy --k K.npy --v V.npy --png WEIGHTS.png [options]

  --q, --k, --v    as for `attention run` (V's rows must match K's)
  --png FILE       the image: query rows down, key columns across, viridis colours
                   from 0 to the largest weight, with a colour bar and a title
  --weights-out W.npy
                   also write the n_q × n_kv weights (the inputs' dtype)
  --threads N      compute on N threads
ATTENTION_OPTIONS

Large matrices: DOWNSAMPLE_RULE.
The weights matrix takes n_q·n_kv memory.

Example:
  attention heatmap --q q.npy --k k.npy --v v.npy --causal top-left --alibi 0.25 \\
      --png weights.png
";

/// The options `run` and `heatmap` share.
const OPTIONS_HELP: &str = "
Attention options (all combine; PyTorch / FlashAttention meanings):
  --causal top-left|bottom-right
                   query i sees keys j ≤ i (top-left, PyTorch's is_causal) or
                   j ≤ i + n_kv − n_q (bottom-right, FlashAttention)
  --scale S        scores are S·q·k (default 1/√d_k)
  --window L,R     query i sees keys diag(i) − L ≤ j ≤ diag(i) + R; -1 = unbounded
  --softcap C      scores become C·tanh(s/C) (C > 0)
  --alibi M        ALiBi: scores minus M·|diag(i) − j|
                   (diag(i) = i with top-left causal, i + n_kv − n_q otherwise)
  --mask M.npy     bool n_q × n_kv mask, true = may attend
  --bias B.npy     additive n_q × n_kv bias (the data's dtype; -inf masks)
";

/// The options every attention command takes.
#[derive(Debug, Default)]
struct AttentionArgs {
    /// `--q`.
    q: Option<PathBuf>,
    /// `--k`.
    k: Option<PathBuf>,
    /// `--v`.
    v: Option<PathBuf>,
    /// `--mask`.
    mask: Option<PathBuf>,
    /// `--bias`.
    bias: Option<PathBuf>,
    /// The attention options.
    options: OptionArgs,
    /// `--threads`.
    threads: Option<usize>,
}

/// What the command line asks for.
#[derive(Debug)]
enum Command {
    /// Print this help text.
    Help(String),
    /// `attention qkv`.
    Qkv {
        /// `--x`: the tokens.
        x: PathBuf,
        /// `--wq`: W_q.
        wq: PathBuf,
        /// `--wk`: W_k.
        wk: PathBuf,
        /// `--wv`: W_v.
        wv: PathBuf,
        /// `--out-dir`: where q.npy, k.npy and v.npy go.
        out_dir: PathBuf,
    },
    /// `attention run`.
    Run {
        /// Inputs and options.
        attention: AttentionArgs,
        /// `--out`: the output file.
        out: PathBuf,
        /// `--lse`: the log-sum-exp file, if asked for.
        lse: Option<PathBuf>,
        /// `--chunk-rows`: rows per chunk.
        chunk_rows: usize,
    },
    /// `attention heatmap`.
    Heatmap {
        /// Inputs and options.
        attention: AttentionArgs,
        /// `--png`: the image file.
        png: PathBuf,
        /// `--weights-out`: the weights file, if asked for.
        weights_out: Option<PathBuf>,
    },
}

/// Parses the command line, runs the command, reports any error.
fn main() -> ExitCode {
    let command = match parse_args() {
        Ok(command) => command,
        Err(e) => {
            eprintln!("error: {e}\n(see `attention --help`)");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Help(text) => {
            print!("{text}");
            Ok(())
        }
        Command::Qkv {
            x,
            wq,
            wk,
            wv,
            out_dir,
        } => qkv(&x, &wq, &wk, &wv, &out_dir),
        Command::Run {
            attention,
            out,
            lse,
            chunk_rows,
        } => on_threads(attention.threads, || {
            run(&attention, &out, lse.as_deref(), chunk_rows)
        }),
        Command::Heatmap {
            attention,
            png,
            weights_out,
        } => on_threads(attention.threads, || {
            draw_heatmap(&attention, &png, weights_out.as_deref())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A command's help text, with the shared parts filled in.
fn help(text: &str) -> String {
    text.replace("ATTENTION_OPTIONS\n", OPTIONS_HELP)
        .replace("DOWNSAMPLE_RULE", heatmap::DOWNSAMPLE_RULE)
}

/// Parses the command line (lexopt's errors are worded for the user).
fn parse_args() -> std::result::Result<Command, lexopt::Error> {
    let mut parser = lexopt::Parser::from_env();
    let command = match parser.next()? {
        None => return Err("no command given: expected qkv, run or heatmap".into()),
        Some(Short('h') | Long("help")) => return Ok(Command::Help(HELP.to_string())),
        Some(Value(name)) => name.string()?,
        Some(other) => return Err(other.unexpected()),
    };
    match command.as_str() {
        "qkv" => parse_qkv(&mut parser),
        "run" => parse_run(&mut parser),
        "heatmap" => parse_heatmap(&mut parser),
        "help" => Ok(Command::Help(HELP.to_string())),
        other => Err(format!("unknown command '{other}': expected qkv, run or heatmap").into()),
    }
}

/// A required option's value, or an error naming it.
fn required<T>(
    value: Option<T>,
    command: &str,
    option: &str,
) -> std::result::Result<T, lexopt::Error> {
    value.ok_or_else(|| format!("{command}: missing {option}").into())
}

/// The options of `attention qkv`.
fn parse_qkv(parser: &mut lexopt::Parser) -> std::result::Result<Command, lexopt::Error> {
    let (mut x, mut wq, mut wk, mut wv, mut out_dir) = (None, None, None, None, None);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(QKV_HELP.to_string())),
            Long("x") => x = Some(parser.value()?.into()),
            Long("wq") => wq = Some(parser.value()?.into()),
            Long("wk") => wk = Some(parser.value()?.into()),
            Long("wv") => wv = Some(parser.value()?.into()),
            Long("out-dir") => out_dir = Some(parser.value()?.into()),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Qkv {
        x: required(x, "qkv", "--x")?,
        wq: required(wq, "qkv", "--wq")?,
        wk: required(wk, "qkv", "--wk")?,
        wv: required(wv, "qkv", "--wv")?,
        out_dir: required(out_dir, "qkv", "--out-dir")?,
    })
}

/// The options of `attention run`.
fn parse_run(parser: &mut lexopt::Parser) -> std::result::Result<Command, lexopt::Error> {
    let mut attention = AttentionArgs::default();
    let (mut out, mut lse) = (None, None);
    // `--chunk-rows C` (not in --help, for tests): compute the queries in chunks of C rows
    // (a multiple of 64, the kernels' query block) from n_q ≥ 2·C on; default 1024.
    let mut chunk_rows = DEFAULT_CHUNK_ROWS;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(help(RUN_HELP))),
            Long("out") => out = Some(parser.value()?.into()),
            Long("lse") => lse = Some(parser.value()?.into()),
            Long("chunk-rows") => {
                let text = parser.value()?.string()?;
                chunk_rows = match text.parse::<usize>() {
                    Ok(c) if c >= CHUNK_ALIGN && c.is_multiple_of(CHUNK_ALIGN) => c,
                    _ => {
                        return Err(format!(
                            "--chunk-rows: expected a multiple of {CHUNK_ALIGN} (at least {CHUNK_ALIGN}), found '{text}'"
                        )
                        .into());
                    }
                };
            }
            Long(name) => {
                let name = name.to_string();
                parse_attention_option(&name, parser, &mut attention)?;
            }
            _ => return Err(arg.unexpected()),
        }
    }
    check_attention(&attention, "run")?;
    Ok(Command::Run {
        attention,
        out: required(out, "run", "--out")?,
        lse,
        chunk_rows,
    })
}

/// The options of `attention heatmap`.
fn parse_heatmap(parser: &mut lexopt::Parser) -> std::result::Result<Command, lexopt::Error> {
    let mut attention = AttentionArgs::default();
    let (mut png, mut weights_out) = (None, None);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(help(HEATMAP_HELP))),
            Long("png") => png = Some(parser.value()?.into()),
            Long("weights-out") => weights_out = Some(parser.value()?.into()),
            Long(name) => {
                let name = name.to_string();
                parse_attention_option(&name, parser, &mut attention)?;
            }
            _ => return Err(arg.unexpected()),
        }
    }
    check_attention(&attention, "heatmap")?;
    Ok(Command::Heatmap {
        attention,
        png: required(png, "heatmap", "--png")?,
        weights_out,
    })
}

/// Errors for a missing `--q`, `--k` or `--v`.
fn check_attention(args: &AttentionArgs, command: &str) -> std::result::Result<(), lexopt::Error> {
    required(args.q.as_ref(), command, "--q")?;
    required(args.k.as_ref(), command, "--k")?;
    required(args.v.as_ref(), command, "--v")?;
    Ok(())
}

/// Reads one of the options every attention command takes (`--name`), or rejects it.
fn parse_attention_option(
    name: &str,
    parser: &mut lexopt::Parser,
    args: &mut AttentionArgs,
) -> std::result::Result<(), lexopt::Error> {
    let number = |option: &str, text: String| -> std::result::Result<String, lexopt::Error> {
        match text.parse::<f64>() {
            Ok(_) => Ok(text),
            Err(_) => Err(format!("{option}: expected a number, found '{text}'").into()),
        }
    };
    match name {
        "q" => args.q = Some(parser.value()?.into()),
        "k" => args.k = Some(parser.value()?.into()),
        "v" => args.v = Some(parser.value()?.into()),
        "mask" => {
            args.mask = Some(parser.value()?.into());
            args.options.mask = true;
        }
        "bias" => {
            args.bias = Some(parser.value()?.into());
            args.options.bias = true;
        }
        "causal" => {
            args.options.causal = Some(match parser.value()?.string()?.as_str() {
                "top-left" => Causal::TopLeft,
                "bottom-right" => Causal::BottomRight,
                other => {
                    return Err(format!(
                        "--causal: expected top-left or bottom-right, found '{other}'"
                    )
                    .into());
                }
            });
        }
        "scale" => args.options.scale = Some(number("--scale", parser.value()?.string()?)?),
        "softcap" => {
            args.options.softcap = Some(number("--softcap", parser.value()?.string()?)?);
        }
        "alibi" => args.options.alibi = Some(number("--alibi", parser.value()?.string()?)?),
        "window" => {
            let text = parser.value()?.string()?;
            args.options.window = Some(parse_window(&text).ok_or_else(|| {
                format!("--window: expected L,R (whole numbers, -1 = unbounded), found '{text}'")
            })?);
        }
        "threads" => {
            let text = parser.value()?.string()?;
            args.threads = Some(match text.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(
                        format!("--threads: expected a whole number ≥ 1, found '{text}'").into(),
                    );
                }
            });
        }
        _ => return Err(format!("invalid option '--{name}'").into()),
    }
    Ok(())
}

/// `L,R` with `-1` for an unbounded side (`usize::MAX`).
fn parse_window(text: &str) -> Option<(usize, usize)> {
    let side = |s: &str| match s.trim() {
        "-1" => Some(usize::MAX),
        s => s.parse().ok(),
    };
    let (left, right) = text.split_once(',')?;
    Some((side(left)?, side(right)?))
}

/// Runs `work` inside a rayon pool of `threads` threads, or on rayon's global pool.
fn on_threads(threads: Option<usize>, work: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    let Some(n) = threads else {
        return work();
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| Error(format!("--threads {n}: cannot start the threads ({e})")))?;
    pool.install(work)
}

/// Checks that the float files all have one dtype, and says which: `Ok(false)` for
/// float32, `Ok(true)` for float64.
fn is_f64(files: &[(&Path, &FloatMatrix)]) -> Result<bool> {
    let first = files[0].1.dtype_name();
    if files.iter().all(|(_, m)| m.dtype_name() == first) {
        return Ok(matches!(files[0].1, FloatMatrix::F64(_)));
    }
    let list: Vec<String> = files
        .iter()
        .map(|(p, m)| format!("{} is {}", p.display(), m.dtype_name()))
        .collect();
    Err(Error(format!(
        "the data files must all have the same float dtype, but {}",
        list.join(", ")
    )))
}

/// The matrices of `files` as `T` (their dtype was checked by [`is_f64`]).
fn typed<T: NpyFloat>(files: Vec<FloatMatrix>) -> Result<Vec<DMatrix<T>>> {
    files
        .into_iter()
        .map(|m| T::take(m).ok_or_else(|| Error::new("internal error: a dtype changed")))
        .collect()
}

/// `attention qkv`.
fn qkv(x: &Path, wq: &Path, wk: &Path, wv: &Path, out_dir: &Path) -> Result<()> {
    let paths = [x, wq, wk, wv];
    let matrices = paths
        .iter()
        .map(|p| npy::read_float_matrix(p))
        .collect::<Result<Vec<_>>>()?;
    let files: Vec<_> = paths.iter().copied().zip(&matrices).collect();
    if is_f64(&files)? {
        qkv_typed::<f64>(typed(matrices)?, out_dir)
    } else {
        qkv_typed::<f32>(typed(matrices)?, out_dir)
    }
}

/// `attention qkv` in the files' float type.
fn qkv_typed<T: NpyFloat>(m: Vec<DMatrix<T>>, out_dir: &Path) -> Result<()> {
    let (q, k, v) = compute_qkv(&m[0], &m[1], &m[2], &m[3])?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error(format!("cannot create {}: {e}", out_dir.display())))?;
    npy::write_matrix(&out_dir.join("q.npy"), &q)?;
    npy::write_matrix(&out_dir.join("k.npy"), &k)?;
    npy::write_matrix(&out_dir.join("v.npy"), &v)
}

/// The inputs of an attention command, read and dtype-checked, and handed to `work` in
/// their float type.
trait WithInputs {
    /// Does the work in `T`.
    fn call<T: NpyFloat>(self, inputs: Inputs<'_, T>) -> Result<()>;
}

/// Reads Q, K, V, the bias and the mask, checks the dtypes and calls `work` with them.
fn with_inputs(args: &AttentionArgs, work: impl WithInputs) -> Result<()> {
    let (Some(q), Some(k), Some(v)) = (&args.q, &args.k, &args.v) else {
        return Err(Error::new("--q, --k and --v are required"));
    };
    let mut paths = vec![q.as_path(), k.as_path(), v.as_path()];
    paths.extend(args.bias.as_deref());
    let matrices = paths
        .iter()
        .map(|p| npy::read_float_matrix(p))
        .collect::<Result<Vec<_>>>()?;
    let mask = args
        .mask
        .as_deref()
        .map(npy::read_bool_matrix)
        .transpose()?;
    let files: Vec<_> = paths.iter().copied().zip(&matrices).collect();
    if is_f64(&files)? {
        call_typed::<f64>(typed(matrices)?, mask.as_ref(), work)
    } else {
        call_typed::<f32>(typed(matrices)?, mask.as_ref(), work)
    }
}

/// Calls `work` with the matrices of `with_inputs` (Q, K, V, then the bias if any).
fn call_typed<T: NpyFloat>(
    m: Vec<DMatrix<T>>,
    mask: Option<&DMatrix<bool>>,
    work: impl WithInputs,
) -> Result<()> {
    work.call(Inputs {
        q: &m[0],
        k: &m[1],
        v: &m[2],
        mask,
        bias: m.get(3),
    })
}

/// `attention run`.
fn run(args: &AttentionArgs, out: &Path, lse: Option<&Path>, chunk_rows: usize) -> Result<()> {
    /// The output files and chunking of a run.
    struct Run<'a> {
        options: &'a OptionArgs,
        out: &'a Path,
        lse: Option<&'a Path>,
        chunk_rows: usize,
    }
    impl WithInputs for Run<'_> {
        fn call<T: NpyFloat>(self, inputs: Inputs<'_, T>) -> Result<()> {
            let with_lse = self.lse.is_some();
            let result = compute::attend(inputs, self.options, with_lse, self.chunk_rows, true)?;
            npy::write_matrix(self.out, &result.output)?;
            if let (Some(path), Some(lse)) = (self.lse, &result.lse) {
                npy::write_vector(path, lse)?;
            }
            Ok(())
        }
    }
    with_inputs(
        args,
        Run {
            options: &args.options,
            out,
            lse,
            chunk_rows,
        },
    )
}

/// `attention heatmap`.
fn draw_heatmap(args: &AttentionArgs, png: &Path, weights_out: Option<&Path>) -> Result<()> {
    /// The files of a heatmap.
    struct Draw<'a> {
        options: &'a OptionArgs,
        png: &'a Path,
        weights_out: Option<&'a Path>,
    }
    impl WithInputs for Draw<'_> {
        fn call<T: NpyFloat>(self, inputs: Inputs<'_, T>) -> Result<()> {
            let options = self
                .options
                .options(inputs.mask.map(|m| m.into()), inputs.bias.map(|b| b.into()))?;
            let weights = attention_weights(inputs.q, inputs.k, inputs.v, &options)?;
            if let Some(path) = self.weights_out {
                npy::write_matrix(path, &weights)?;
            }
            let (n_q, n_kv) = weights.shape();
            if n_q == 0 || n_kv == 0 {
                return Err(Error(format!(
                    "the attention weights are {n_q} × {n_kv}: no query or no key, nothing to draw"
                )));
            }
            let described = self.options.describe();
            let title = if described.is_empty() {
                format!("attention weights ({n_q} × {n_kv})")
            } else {
                format!("attention weights ({n_q} × {n_kv}, {described})")
            };
            heatmap::render(&weights.map(|w| w.to_f64()), &title).write_png(self.png)
        }
    }
    with_inputs(
        args,
        Draw {
            options: &args.options,
            png,
            weights_out,
        },
    )
}
