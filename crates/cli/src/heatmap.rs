//! Attention weights as a PNG heatmap: query rows down, key columns across, with axes,
//! tick labels, a colour bar and a title.
//!
//! Every image is [`WIDTH`] × [`HEIGHT`] pixels with the weights in a square plot of
//! [`PLOT`] × [`PLOT`] pixels at ([`PLOT_LEFT`], [`PLOT_TOP`]). A matrix with more than
//! [`MAX_CELLS`] rows or columns is downsampled first ([`DOWNSAMPLE_RULE`]); [`Layout`]
//! says which pixels each cell covers. Colours are viridis, from 0 (dark purple) to the
//! largest weight shown (yellow). Text is DejaVu Sans (bundled, see
//! `assets/DejaVuSans-LICENSE.txt`) rasterised by `ab_glyph`; the PNG is written by the
//! `png` crate.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use nalgebra::DMatrix;

use crate::{Error, Result};

/// The image's width in pixels.
pub const WIDTH: usize = 760;
/// The image's height in pixels.
pub const HEIGHT: usize = 664;
/// The side of the square plot of the weights, in pixels.
pub const PLOT: usize = 512;
/// The plot's left edge.
pub const PLOT_LEFT: usize = 96;
/// The plot's top edge.
pub const PLOT_TOP: usize = 84;
/// At most this many cells per axis: larger matrices are downsampled.
pub const MAX_CELLS: usize = 512;
/// How larger matrices are downsampled (for `--help`).
pub const DOWNSAMPLE_RULE: &str = "a matrix larger than 512 in either direction is shown as the
maximum over blocks of ⌈n_q/512⌉ × ⌈n_kv/512⌉ weights (the last block of a row or column
may be partial); the subtitle states the block size";

/// The bar's left edge.
const BAR_LEFT: usize = PLOT_LEFT + PLOT + 36;
/// The bar's width.
const BAR_WIDTH: usize = 22;

/// DejaVu Sans, bundled so that no system font library is needed.
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [20, 20, 20];
const FRAME: Rgb = [90, 90, 90];

/// Where the cells of an `n_q × n_kv` weight matrix land in the image.
///
/// Cell `(r, c)` shows the weights of rows `r·block.0 ..` and columns `c·block.1 ..`
/// (one weight when nothing is downsampled) and covers the pixels
/// [`cell_rect`](Self::cell_rect) returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Query rows of the matrix.
    pub n_q: usize,
    /// Key columns of the matrix.
    pub n_kv: usize,
    /// Weights per cell: `(⌈n_q/512⌉, ⌈n_kv/512⌉)` rows × columns.
    pub block: (usize, usize),
    /// Cells: `(⌈n_q/block.0⌉, ⌈n_kv/block.1⌉)`, each at most [`MAX_CELLS`].
    pub cells: (usize, usize),
}

impl Layout {
    /// The layout of an `n_q × n_kv` matrix.
    pub fn new(n_q: usize, n_kv: usize) -> Self {
        let block = (
            n_q.div_ceil(MAX_CELLS).max(1),
            n_kv.div_ceil(MAX_CELLS).max(1),
        );
        Layout {
            n_q,
            n_kv,
            block,
            cells: (n_q.div_ceil(block.0), n_kv.div_ceil(block.1)),
        }
    }

    /// Whether cells show blocks of more than one weight.
    pub fn downsampled(&self) -> bool {
        self.block != (1, 1)
    }

    /// The cell that shows weight `(i, j)`.
    pub fn cell_of(&self, i: usize, j: usize) -> (usize, usize) {
        (i / self.block.0, j / self.block.1)
    }

    /// The pixels of cell `(r, c)`: `x0 .. x1` across, `y0 .. y1` down, as
    /// `(x0, y0, x1, y1)`. The plot's [`PLOT`] pixels are split as evenly as whole pixels
    /// allow.
    pub fn cell_rect(&self, r: usize, c: usize) -> (usize, usize, usize, usize) {
        // An empty matrix has no cells; `max(1)` keeps the arithmetic defined.
        let (rows, cols) = (self.cells.0.max(1), self.cells.1.max(1));
        (
            PLOT_LEFT + c * PLOT / cols,
            PLOT_TOP + r * PLOT / rows,
            PLOT_LEFT + (c + 1) * PLOT / cols,
            PLOT_TOP + (r + 1) * PLOT / rows,
        )
    }

    /// The pixel at the centre of cell `(r, c)`, as `(x, y)`.
    pub fn cell_center(&self, r: usize, c: usize) -> (usize, usize) {
        let (x0, y0, x1, y1) = self.cell_rect(r, c);
        ((x0 + x1) / 2, (y0 + y1) / 2)
    }

    /// The cells' values: the maximum of each block of weights.
    pub fn cell_values(&self, weights: &DMatrix<f64>) -> DMatrix<f64> {
        let mut cells = DMatrix::from_element(self.cells.0, self.cells.1, f64::NEG_INFINITY);
        for j in 0..self.n_kv {
            for i in 0..self.n_q {
                let (r, c) = self.cell_of(i, j);
                cells[(r, c)] = cells[(r, c)].max(weights[(i, j)]);
            }
        }
        cells
    }

    /// One line under the title: how cells relate to weights, and the colour scale's top.
    fn subtitle(&self, top: f64) -> String {
        let cells = if self.downsampled() {
            format!(
                "each cell: the maximum of a {} × {} block of weights ({} × {} cells)",
                self.block.0, self.block.1, self.cells.0, self.cells.1
            )
        } else {
            "each cell: one weight".to_string()
        };
        format!("{cells}; colours from 0 to the largest weight, {top:.4}")
    }
}

/// An RGB image, row by row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width × height` pixels, rows top to bottom.
    pub pixels: Vec<Rgb>,
}

impl Image {
    /// A white image.
    fn new(width: usize, height: usize) -> Self {
        Image {
            width,
            height,
            pixels: vec![WHITE; width * height],
        }
    }

    /// The pixel at `(x, y)`.
    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        self.pixels[y * self.width + x]
    }

    /// Fills `x0 .. x1` × `y0 .. y1` (clipped to the image).
    fn fill(&mut self, (x0, y0, x1, y1): (usize, usize, usize, usize), colour: Rgb) {
        for y in y0..y1.min(self.height) {
            for x in x0..x1.min(self.width) {
                self.pixels[y * self.width + x] = colour;
            }
        }
    }

    /// A one-pixel outline just outside `x0 .. x1` × `y0 .. y1`.
    fn frame(&mut self, (x0, y0, x1, y1): (usize, usize, usize, usize), colour: Rgb) {
        self.fill((x0 - 1, y0 - 1, x1 + 1, y0), colour);
        self.fill((x0 - 1, y1, x1 + 1, y1 + 1), colour);
        self.fill((x0 - 1, y0, x0, y1), colour);
        self.fill((x1, y0, x1 + 1, y1), colour);
    }

    /// Mixes `colour` into pixel `(x, y)` with weight `coverage` (0 to 1); pixels outside
    /// the image are skipped.
    fn blend(&mut self, x: i64, y: i64, colour: Rgb, coverage: f32) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let a = coverage.clamp(0.0, 1.0);
        let p = &mut self.pixels[y as usize * self.width + x as usize];
        for (old, new) in p.iter_mut().zip(colour) {
            *old = (f32::from(*old) * (1.0 - a) + f32::from(new) * a).round() as u8;
        }
    }

    /// Writes the image as an 8-bit RGB PNG.
    ///
    /// # Errors
    /// The file cannot be created or written.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let failed =
            |e: &dyn std::fmt::Display| Error(format!("cannot write {}: {e}", path.display()));
        let file = File::create(path).map_err(|e| failed(&e))?;
        let mut encoder =
            png::Encoder::new(BufWriter::new(file), self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| failed(&e))?;
        writer
            .write_image_data(self.pixels.as_flattened())
            .map_err(|e| failed(&e))?;
        writer.finish().map_err(|e| failed(&e))
    }
}

/// Text in DejaVu Sans.
struct Text {
    font: FontRef<'static>,
}

/// Where text goes relative to its anchor point.
#[derive(Clone, Copy)]
enum Align {
    /// The anchor is the left end of the text, halfway up.
    Left,
    /// The anchor is the middle of the text.
    Center,
    /// The anchor is the right end, halfway up.
    Right,
}

impl Text {
    fn new() -> Self {
        Text {
            font: FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses"),
        }
    }

    /// The width and height of `s` at `size` pixels.
    fn size(&self, s: &str, size: f32) -> (f32, f32) {
        let font = self.font.as_scaled(PxScale::from(size));
        let mut width = 0.0;
        let mut previous = None;
        for ch in s.chars() {
            let id = font.glyph_id(ch);
            if let Some(p) = previous {
                width += font.kern(p, id);
            }
            width += font.h_advance(id);
            previous = Some(id);
        }
        (width, font.ascent() - font.descent())
    }

    /// Rasterises `s` at `size` pixels, calling `put(x, y, coverage)` with coordinates in
    /// the text's own box (`0 .. width` across, `0 .. height` down).
    fn raster(&self, s: &str, size: f32, mut put: impl FnMut(i64, i64, f32)) {
        let scale = PxScale::from(size);
        let font = self.font.as_scaled(scale);
        let mut caret = 0.0;
        let mut previous = None;
        for ch in s.chars() {
            let id = font.glyph_id(ch);
            if let Some(p) = previous {
                caret += font.kern(p, id);
            }
            let glyph = id.with_scale_and_position(scale, point(caret, font.ascent()));
            caret += font.h_advance(id);
            previous = Some(id);
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let bounds = outline.px_bounds();
                outline.draw(|x, y, c| {
                    put(
                        bounds.min.x as i64 + i64::from(x),
                        bounds.min.y as i64 + i64::from(y),
                        c,
                    );
                });
            }
        }
    }

    /// Draws `s` horizontally at `(x, y)` as `align` says.
    fn draw(&self, image: &mut Image, s: &str, size: f32, (x, y): (f32, f32), align: Align) {
        let (w, h) = self.size(s, size);
        let left = match align {
            Align::Left => x,
            Align::Center => x - w / 2.0,
            Align::Right => x - w,
        };
        let (left, top) = (left.round() as i64, (y - h / 2.0).round() as i64);
        self.raster(s, size, |gx, gy, c| {
            image.blend(left + gx, top + gy, INK, c)
        });
    }

    /// Draws `s` reading upwards, its middle at `(x, y)`.
    fn draw_vertical(&self, image: &mut Image, s: &str, size: f32, (x, y): (f32, f32)) {
        let (w, h) = self.size(s, size);
        let (left, bottom) = ((x - h / 2.0).round() as i64, (y + w / 2.0).round() as i64);
        // Turned a quarter anticlockwise: the text's x runs up, its y runs right.
        self.raster(s, size, |gx, gy, c| {
            image.blend(left + gy, bottom - gx, INK, c)
        });
    }

    /// Draws `s` centred at `(x, y)` at `size`, or smaller if needed to fit in `width`.
    fn draw_fitted(&self, image: &mut Image, s: &str, size: f32, (x, y): (f32, f32), width: f32) {
        let natural = self.size(s, size).0;
        let size = if natural > width {
            size * width / natural
        } else {
            size
        };
        self.draw(image, s, size, (x, y), Align::Center);
    }
}

/// Tick positions `0, step, 2·step, … ≤ max` with a step of 1, 2 or 5 times a power of
/// ten, at most about `count` of them.
fn ticks(max: f64, count: usize, min_step: f64) -> Vec<f64> {
    if max <= 0.0 {
        return vec![0.0];
    }
    let raw = (max / count as f64).max(min_step);
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * power);
    (0..)
        .map(|k| k as f64 * step)
        .take_while(|t| *t <= max * (1.0 + 1e-9))
        .collect()
}

/// The colour of `t` in 0 ..= 1 (viridis).
pub fn colour(t: f64) -> Rgb {
    let c = colorous::VIRIDIS.eval_continuous(t.clamp(0.0, 1.0));
    [c.r, c.g, c.b]
}

/// Draws the heatmap of `weights` (`n_q × n_kv`, values in 0 ..= 1) with `title` on top.
pub fn render(weights: &DMatrix<f64>, title: &str) -> Image {
    let layout = Layout::new(weights.nrows(), weights.ncols());
    let cells = layout.cell_values(weights);
    let top = cells.iter().copied().fold(0.0, f64::max);
    let top = if top > 0.0 { top } else { 1.0 };
    let text = Text::new();
    let mut image = Image::new(WIDTH, HEIGHT);

    // Title and subtitle.
    let centre = WIDTH as f32 / 2.0;
    text.draw_fitted(&mut image, title, 19.0, (centre, 22.0), WIDTH as f32 - 16.0);
    text.draw_fitted(
        &mut image,
        &layout.subtitle(top),
        13.0,
        (centre, 48.0),
        WIDTH as f32 - 16.0,
    );

    // The cells.
    for r in 0..layout.cells.0 {
        for c in 0..layout.cells.1 {
            image.fill(layout.cell_rect(r, c), colour(cells[(r, c)] / top));
        }
    }
    let plot = (PLOT_LEFT, PLOT_TOP, PLOT_LEFT + PLOT, PLOT_TOP + PLOT);
    image.frame(plot, FRAME);

    // Index ticks: at the centre of the cell holding that index.
    let label = 12.0;
    for t in ticks(layout.n_q.saturating_sub(1) as f64, 8, 1.0) {
        if layout.n_q == 0 {
            break;
        }
        let (_, y) = layout.cell_center(layout.cell_of(t as usize, 0).0, 0);
        image.fill((PLOT_LEFT - 6, y, PLOT_LEFT - 1, y + 1), FRAME);
        let at = ((PLOT_LEFT - 9) as f32, y as f32);
        text.draw(&mut image, &format!("{t}"), label, at, Align::Right);
    }
    for t in ticks(layout.n_kv.saturating_sub(1) as f64, 8, 1.0) {
        if layout.n_kv == 0 {
            break;
        }
        let (x, _) = layout.cell_center(0, layout.cell_of(0, t as usize).1);
        image.fill((x, PLOT_TOP + PLOT + 1, x + 1, PLOT_TOP + PLOT + 6), FRAME);
        let at = (x as f32, (PLOT_TOP + PLOT + 16) as f32);
        text.draw(&mut image, &format!("{t}"), label, at, Align::Center);
    }
    let axis = 14.0;
    let plot_middle = (PLOT_LEFT + PLOT / 2) as f32;
    let at = (plot_middle, (PLOT_TOP + PLOT + 40) as f32);
    text.draw(&mut image, "key j", axis, at, Align::Center);
    let at = ((PLOT_LEFT - 62) as f32, (PLOT_TOP + PLOT / 2) as f32);
    text.draw_vertical(&mut image, "query i", axis, at);

    // The colour bar, 0 at the bottom and `top` at the top, with its ticks.
    for y in 0..PLOT {
        let t = 1.0 - y as f64 / (PLOT - 1) as f64;
        let row = PLOT_TOP + y;
        image.fill((BAR_LEFT, row, BAR_LEFT + BAR_WIDTH, row + 1), colour(t));
    }
    image.frame(
        (BAR_LEFT, PLOT_TOP, BAR_LEFT + BAR_WIDTH, PLOT_TOP + PLOT),
        FRAME,
    );
    let values = ticks(top, 5, 0.0);
    let step = values.get(1).map_or(1.0, |s| s - values[0]);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    for v in values {
        let y = PLOT_TOP + ((1.0 - v / top) * (PLOT - 1) as f64).round() as usize;
        let right = BAR_LEFT + BAR_WIDTH;
        image.fill((right, y, right + 5, y + 1), FRAME);
        let at = ((right + 8) as f32, y as f32);
        text.draw(
            &mut image,
            &format!("{v:.decimals$}"),
            label,
            at,
            Align::Left,
        );
    }
    let at = ((BAR_LEFT + BAR_WIDTH / 2) as f32, (PLOT_TOP - 14) as f32);
    text.draw(&mut image, "weight", label, at, Align::Center);
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(
            ticks(7.0, 8, 1.0),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        );
        assert_eq!(ticks(999.0, 8, 1.0)[1], 200.0);
        assert_eq!(
            ticks(1.0, 5, 0.0),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(ticks(0.0, 5, 0.0), vec![0.0]);
    }

    #[test]
    fn large_matrices_are_downsampled_to_at_most_512_cells() {
        let layout = Layout::new(1000, 1025);
        assert_eq!(layout.block, (2, 3));
        assert_eq!(layout.cells, (500, 342));
        assert_eq!(
            Layout::new(8, 8).cell_rect(1, 2),
            (
                PLOT_LEFT + 128,
                PLOT_TOP + 64,
                PLOT_LEFT + 192,
                PLOT_TOP + 128
            )
        );
    }
}
