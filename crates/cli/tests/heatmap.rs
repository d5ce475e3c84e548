//! `attention heatmap`: the PNG decodes with the documented size, and cells land where
//! `heatmap::Layout` says with the colours of their weights.

mod common;

use std::path::Path;

use attention_cli::heatmap::{self, HEIGHT, Layout, WIDTH};
use common::{arg, fails, ok, read_f64, write};
use nalgebra::DMatrix;

/// The decoded RGB image: width, height, pixels row by row.
fn decode(path: &Path) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn pixel(image: &(usize, usize, Vec<u8>), (x, y): (usize, usize)) -> [u8; 3] {
    let at = 3 * (y * image.0 + x);
    [image.2[at], image.2[at + 1], image.2[at + 2]]
}

/// Whether `a` is within a few levels of `b` in each channel.
fn near(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 3)
}

#[test]
fn identity_like_weights_light_the_diagonal() {
    let dir = tempfile::tempdir().unwrap();
    let qk = write(
        dir.path(),
        "qk.npy",
        &(DMatrix::<f64>::identity(8, 8) * 20.0),
    );
    let v = write(
        dir.path(),
        "v.npy",
        &DMatrix::<f64>::from_fn(8, 3, |i, j| (i + j) as f64),
    );
    let (png, weights) = (dir.path().join("w.png"), dir.path().join("w.npy"));
    ok(&[
        "heatmap",
        "--q",
        &arg(&qk),
        "--k",
        &arg(&qk),
        "--v",
        &arg(&v),
        "--png",
        &arg(&png),
        "--weights-out",
        &arg(&weights),
    ]);
    let image = decode(&png);
    assert_eq!((image.0, image.1), (WIDTH, HEIGHT));

    // Scores 400/√8 ≈ 141 on the diagonal, 0 off it: weights 1 and e^-141.
    let w = read_f64(&weights);
    assert_eq!(w.shape(), (8, 8));
    assert!((w[(3, 3)] - 1.0).abs() < 1e-15 && w[(3, 4)] < 1e-60);

    let layout = Layout::new(8, 8);
    let (bright, dark) = (heatmap::colour(1.0), heatmap::colour(0.0));
    for i in 0..8 {
        for j in 0..8 {
            let p = pixel(&image, layout.cell_center(i, j));
            let want = if i == j { bright } else { dark };
            assert!(near(p, want), "cell ({i}, {j}): {p:?}, expected {want:?}");
        }
    }
    // The top of the colour map is bright (yellow), the bottom dark (purple).
    assert!(bright.iter().map(|&c| u32::from(c)).sum::<u32>() > 450);
    assert!(dark.iter().map(|&c| u32::from(c)).sum::<u32>() < 200);
}

#[test]
fn a_1000_by_1000_matrix_is_shown_as_block_maxima() {
    // Causal, top-left, with all scores equal: row i gives 1/(i+1) to keys 0..=i.
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "q.npy", &DMatrix::<f32>::zeros(1000, 4));
    let png = dir.path().join("w.png");
    ok(&[
        "heatmap",
        "--q",
        &arg(&q),
        "--k",
        &arg(&q),
        "--v",
        &arg(&q),
        "--causal",
        "top-left",
        "--png",
        &arg(&png),
    ]);
    let image = decode(&png);
    assert_eq!((image.0, image.1), (WIDTH, HEIGHT));

    let layout = Layout::new(1000, 1000);
    assert!(layout.downsampled());
    assert_eq!((layout.block, layout.cells), ((2, 2), (500, 500)));
    // Cell (0, 0) holds weights 1, 0, 0.5, 0.5: its maximum is 1, the top colour (a
    // mean would give 0.5). Cell (0, 1) holds only masked weights: 0.
    assert!(near(
        pixel(&image, layout.cell_center(0, 0)),
        heatmap::colour(1.0)
    ));
    assert!(near(
        pixel(&image, layout.cell_center(0, 1)),
        heatmap::colour(0.0)
    ));
    // Cell (1, 0): rows 2–3 give at most 1/3.
    assert!(near(
        pixel(&image, layout.cell_center(1, 0)),
        heatmap::colour(1.0 / 3.0)
    ));
}

#[test]
fn heatmap_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "q.npy", &DMatrix::<f64>::zeros(3, 2));
    let v = write(dir.path(), "v.npy", &DMatrix::<f64>::zeros(4, 2));
    let png = arg(&dir.path().join("w.png"));
    let stderr = fails(&[
        "heatmap",
        "--q",
        &arg(&q),
        "--k",
        &arg(&q),
        "--v",
        &arg(&v),
        "--png",
        &png,
    ]);
    assert!(
        stderr.contains("value has 4 rows but key has 3"),
        "{stderr}"
    );
    let stderr = fails(&[
        "heatmap",
        "--q",
        &arg(&q),
        "--k",
        &arg(&q),
        "--v",
        &arg(&q),
        "--png",
        "/nonexistent/w.png",
    ]);
    assert!(
        stderr.contains("cannot write /nonexistent/w.png"),
        "{stderr}"
    );
}

#[test]
fn an_empty_matrix_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "q.npy", &DMatrix::<f64>::zeros(3, 2));
    let k = write(dir.path(), "k.npy", &DMatrix::<f64>::zeros(0, 2));
    let png = arg(&dir.path().join("w.png"));
    let stderr = fails(&[
        "heatmap",
        "--q",
        &arg(&q),
        "--k",
        &arg(&k),
        "--v",
        &arg(&k),
        "--png",
        &png,
    ]);
    assert!(
        stderr.contains("3 × 0") && stderr.contains("nothing to draw"),
        "{stderr}"
    );
}
