//! The numpy exercise this library starts from, in Rust: prints the self-attention of the
//! seed's 2-token example in f64 and f32.
//!
//! Run with `cargo run --release --example seed`.

use attention_core::{AttentionError, Element, compute_qkv, self_attention};
use nalgebra::DMatrix;

fn seed<T: Element>() -> Result<DMatrix<T>, AttentionError> {
    let m = |v: [f64; 4]| DMatrix::from_row_slice(2, 2, &v.map(T::from_f64_rounded));
    let x = m([1.0, 0.0, 0.0, 1.0]);
    let w_q = m([1.0, 0.0, 0.0, 1.0]);
    let w_k = m([1.0, 0.0, 0.0, 1.0]);
    let w_v = m([1.0, 2.0, 3.0, 4.0]);
    let (q, k, v) = compute_qkv(&x, &w_q, &w_k, &w_v)?;
    self_attention(&q, &k, &v)
}

fn print<T: Element>(name: &str, out: &DMatrix<T>) {
    println!("{name}:");
    for i in 0..out.nrows() {
        let row: Vec<String> = (0..out.ncols())
            .map(|j| format!("{:.7}", out[(i, j)].to_f64()))
            .collect();
        println!("  [{}]", row.join(", "));
    }
}

fn main() -> Result<(), AttentionError> {
    print("f64", &seed::<f64>()?);
    print("f32", &seed::<f32>()?);
    Ok(())
}
