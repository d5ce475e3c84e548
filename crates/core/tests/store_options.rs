//! The two ways the block kernel applies ALiBi and a bias give the same bits. With a bias
//! whose columns are contiguous (row stride 1), or ALiBi alone, and no softcap, they are
//! applied as each tile's scores are stored (`Spec::options_at_store`,
//! `MicroKernels::scores`; the bias only in full blocks of queries); with a bias stored by
//! rows, in the pass of the options over the tile (`Spec::modify_column`). Both compute
//! `fl(fl(fl(scale·q·k) − fl(m·dist)) + b)` from the same operands, so outputs and lse must
//! be equal bit for bit, on every CPU path, at sizes across the query blocks (64 or 32
//! queries, 16 on the portable f64 path), the key tiles (60 or 64 keys) and the register
//! tiles (4 or 6 keys), with −∞ entries, alone and with the options after them (bool mask,
//! key mask, causal band). The stored-by-rows form takes the path checked against the
//! reference in `options.rs`.

mod common;

use attention_core::{
    AttentionOptions, Causal, CpuPath, Element, scaled_dot_product_attention_with_lse,
};
use common::*;
use nalgebra::{DMatrix, DMatrixView, Dyn};

/// The bias `n_q × n_kv` with about one entry in 8 set to −∞, and a whole row of them.
fn bias(n_q: usize, n_kv: usize, seed: u64) -> DMatrix<f64> {
    let mut b = gaussian(n_q, n_kv, 2.0, seed);
    for i in 0..n_q {
        for j in 0..n_kv {
            if (i * 31 + j * 17 + seed as usize).is_multiple_of(8) || i == n_q / 2 {
                b[(i, j)] = f64::NEG_INFINITY;
            }
        }
    }
    b
}

#[derive(Clone, Copy, Debug)]
enum After {
    Nothing,
    BoolMask,
    KeyMask,
    Causal,
    /// ALiBi before the bias (both at the store with the bias by columns).
    Alibi,
    /// ALiBi, the bias and a bool mask after them.
    AlibiMask,
}

fn with_after<'a, T: Element>(
    o: AttentionOptions<'a, T>,
    after: After,
    mask: &'a DMatrix<bool>,
    key_mask: &'a [bool],
) -> AttentionOptions<'a, T> {
    match after {
        After::Nothing => o,
        After::BoolMask => o.with_mask(mask),
        After::KeyMask => o.with_key_mask(key_mask),
        After::Causal => o.with_causal(Causal::BottomRight),
        After::Alibi => o.with_alibi_slope(T::from_f64_rounded(0.37)),
        After::AlibiMask => o
            .with_alibi_slope(T::from_f64_rounded(-0.21))
            .with_mask(mask)
            .with_causal(Causal::TopLeft),
    }
}

fn check<T: Element>(n_q: usize, n_kv: usize, d: usize, after: After, seed: u64) {
    let q = narrow::<T>(&gaussian(n_q, d, 1.0, seed));
    let k = narrow::<T>(&gaussian(n_kv, d, 1.0, seed + 1));
    let v = narrow::<T>(&gaussian(n_kv, d, 1.0, seed + 2));
    let b = narrow::<T>(&bias(n_q, n_kv, seed + 3));
    // The same bias three ways: owned (by columns), a block of a larger matrix (by
    // columns, column stride ≠ n_q, first entry not at the start), and by rows.
    let mut wide = DMatrix::from_element(n_q + 5, n_kv + 2, T::from_f64_rounded(f64::NAN));
    wide.view_mut((3, 1), (n_q, n_kv)).copy_from(&b);
    let by_rows: Vec<T> = b.transpose().as_slice().to_vec();
    let by_rows = DMatrixView::from_slice_with_strides_generic(
        &by_rows,
        Dyn(n_q),
        Dyn(n_kv),
        Dyn(n_kv),
        Dyn(1),
    );
    let mask = DMatrix::from_fn(n_q, n_kv, |i, j| (i * 7 + j * 3) % 10 != 0);
    let key_mask: Vec<bool> = (0..n_kv).map(|j| j % 9 != 4).collect();
    for path in CpuPath::supported() {
        let run = |o: AttentionOptions<'_, T>| {
            let o = with_after(o.with_cpu_path(path), after, &mask, &key_mask);
            scaled_dot_product_attention_with_lse(&q, &k, &v, &o).expect("a valid call")
        };
        let label = format!(
            "{} n_q {n_q} n_kv {n_kv} d {d} {after:?} {path:?}",
            std::any::type_name::<T>()
        );
        let (want, want_lse) = run(AttentionOptions::new().with_bias(by_rows));
        let (plain, _) = run(AttentionOptions::new());
        assert!(
            want.iter().zip(plain.iter()).any(|(a, b)| a != b),
            "{label}: the bias changes nothing"
        );
        for (form, o) in [
            ("owned", AttentionOptions::new().with_bias(&b)),
            (
                "block of a wider matrix",
                AttentionOptions::new().with_bias(wide.view((3, 1), (n_q, n_kv))),
            ),
        ] {
            let (out, lse) = run(o);
            for (idx, (x, y)) in out.iter().zip(want.iter()).enumerate() {
                assert!(
                    x.to_f64().to_bits() == y.to_f64().to_bits(),
                    "{label}, {form}: output entry {idx}: {x:?} against {y:?} by rows"
                );
            }
            for (i, (x, y)) in lse.iter().zip(want_lse.iter()).enumerate() {
                assert!(
                    x.to_f64().to_bits() == y.to_f64().to_bits(),
                    "{label}, {form}: lse {i}: {x:?} against {y:?} by rows"
                );
            }
        }
    }
}

fn sweep<T: Element>() {
    let mut seed = 100;
    for (n_q, n_kv) in [
        (9, 61),
        (16, 64),
        (32, 60),
        (33, 127),
        (64, 61),
        (65, 181),
        (130, 121),
    ] {
        for after in [
            After::Nothing,
            After::BoolMask,
            After::KeyMask,
            After::Causal,
            After::Alibi,
            After::AlibiMask,
        ] {
            check::<T>(n_q, n_kv, 8, after, seed);
            seed += 10;
        }
    }
}

#[test]
fn options_at_the_store_and_in_the_pass_agree_bitwise_f32() {
    sweep::<f32>();
}

#[test]
fn options_at_the_store_and_in_the_pass_agree_bitwise_f64() {
    sweep::<f64>();
}
