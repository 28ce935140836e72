//! Convolution factors without a patch matrix (implicit im2col).
//!
//! A Conv2d layer's A factor is the covariance of its patch vectors: one row per output
//! position `(n, oh, ow)`, one column per weight column `(ci, ki, kj)` in PyTorch's order
//! (`ci * kh * kw + ki * kw + kj`, the order of `weight.reshape(c_out, -1)` and of
//! `torch.nn.functional.unfold`). Its G factor is the covariance of the output gradient
//! with the spatial positions as samples: one row per `(n, oh, ow)`, one column per output
//! channel. [`Patches`] describes either matrix as a view of the 4-d tensor it comes from
//! (any element strides: NCHW, NHWC or a strided view), and every backend reads the
//! tensor through it: the patch matrix (at batch 32 about twice the size of ResNet-50's
//! activations) and the gradient's transpose are never formed in memory.
//!
//! # Normalisation
//!
//! The accumulation divides by the number of rows it is given (`alpha = 1 / rows` for a
//! mean, the first statistics of a THOR step), and a conv layer's factors have
//! `N * Ho * Wo` rows: `A = sum_{n,t} a a^T / (N T)` and `G = sum_{n,t} g g^T / (N T)`,
//! with `T = Ho * Wo` and `g` the gradient of the summed loss at each position. KFC
//! (Grosse and Martens, 2016) uses `Omega = sum_{n,t} a a^T / N` and
//! `Gamma = sum_{n,t} g g^T / (N T)`: its A is `T` times this one, so without damping its
//! preconditioned gradient is this one's times `1 / T`, the per-layer scale
//! `1 / (Ho * Wo)` that THOR's MindSpore code applies to conv layers. Choose with the
//! `alpha` of the accumulation (or [`crate::thor::ConvNorm`] in the optimizer).

use crate::error::{Error, Result};

/// Memory layout of a contiguous 4-d activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    /// `[N, C, H, W]`, W fastest (PyTorch's default).
    Nchw,
    /// `[N, H, W, C]`, C fastest (`torch.channels_last`).
    Nhwc,
}

impl TensorLayout {
    /// Element strides of `[n, c, h, w]` for a contiguous tensor of this layout
    /// (saturating: sizes too large to count are refused by [`Patches::validate`]).
    pub fn strides(self, c: usize, h: usize, w: usize) -> [usize; 4] {
        let hw = h.saturating_mul(w);
        match self {
            TensorLayout::Nchw => [c.saturating_mul(hw), hw, w, 1],
            TensorLayout::Nhwc => [hw.saturating_mul(c), 1, w.saturating_mul(c), c],
        }
    }
}

/// The geometry of a 2-d convolution (groups = 1) over inputs of one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Zero padding `[ph, pw]` on each side.
    pub padding: [usize; 2],
    /// Dilation `[dh, dw]`.
    pub dilation: [usize; 2],
}

/// The largest kernel size, stride, padding or dilation (the kernels keep them in 16 bits).
pub const MAX_CONV_PARAM: usize = i16::MAX as usize;

/// The most rows (`batch * ho * wo`) a patch matrix may have: 2^30, the device's limit on
/// a factor's rows, on every backend.
pub const MAX_PATCH_ROWS: usize = 1 << 30;

/// The largest input height or width, output positions per sample and patch columns
/// (`c_in * kh * kw`): 2^30, so that the kernels' 32-bit index arithmetic cannot overflow.
pub const MAX_CONV_EXTENT: usize = 1 << 30;

impl Conv2dGeometry {
    /// A `kernel[0] x kernel[1]` convolution over `c_in x h x w` inputs, stride 1, no
    /// padding, dilation 1.
    pub fn new(c_in: usize, h: usize, w: usize, kernel: [usize; 2]) -> Self {
        Self {
            c_in,
            h,
            w,
            kernel,
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
        }
    }

    /// With stride `[sh, sw]`.
    pub fn with_stride(mut self, stride: [usize; 2]) -> Self {
        self.stride = stride;
        self
    }

    /// With zero padding `[ph, pw]`.
    pub fn with_padding(mut self, padding: [usize; 2]) -> Self {
        self.padding = padding;
        self
    }

    /// With dilation `[dh, dw]`.
    pub fn with_dilation(mut self, dilation: [usize; 2]) -> Self {
        self.dilation = dilation;
        self
    }

    /// Checks the geometry: every size positive, the dilated kernel no larger than the
    /// padded input, every size within the kernels' integer range. Errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in [("c_in", self.c_in), ("h", self.h), ("w", self.w)] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        for (arg, v) in [("h", self.h), ("w", self.w)] {
            if v > MAX_CONV_EXTENT {
                return Err(Error::invalid(arg, format!("at most {MAX_CONV_EXTENT}")));
            }
        }
        for (arg, v, min) in [
            ("kernel", self.kernel, 1),
            ("stride", self.stride, 1),
            ("padding", self.padding, 0),
            ("dilation", self.dilation, 1),
        ] {
            if v.iter().any(|&x| x < min || x > MAX_CONV_PARAM) {
                return Err(Error::invalid(
                    arg,
                    format!("{v:?}: each must be in {min}..={MAX_CONV_PARAM}"),
                ));
            }
        }
        for i in 0..2 {
            let extent = [self.h, self.w][i];
            let span = (self.kernel[i] - 1) * self.dilation[i] + 1;
            if span > extent + 2 * self.padding[i] {
                return Err(Error::invalid(
                    "kernel",
                    format!(
                        "{:?} with dilation {:?} spans {span} {}, larger than the padded input ({} + 2 * {})",
                        self.kernel,
                        self.dilation,
                        ["rows", "columns"][i],
                        extent,
                        self.padding[i]
                    ),
                ));
            }
        }
        let [ho, wo] = self.output_unchecked();
        if ho.checked_mul(wo).is_none_or(|p| p > MAX_CONV_EXTENT) {
            return Err(Error::invalid(
                "h",
                format!("{ho} x {wo} output positions per sample, at most {MAX_CONV_EXTENT}"),
            ));
        }
        self.c_in
            .checked_mul(self.kernel[0])
            .and_then(|v| v.checked_mul(self.kernel[1]))
            .filter(|&v| v <= MAX_CONV_EXTENT)
            .ok_or_else(|| {
                Error::invalid(
                    "c_in",
                    format!("c_in * kh * kw above {MAX_CONV_EXTENT} columns"),
                )
            })?;
        Ok(())
    }

    fn output_unchecked(&self) -> [usize; 2] {
        [0, 1].map(|i| {
            let extent = [self.h, self.w][i] + 2 * self.padding[i];
            let span = (self.kernel[i] - 1) * self.dilation[i] + 1;
            (extent - span) / self.stride[i] + 1
        })
    }

    /// The output size `[ho, wo]`, as PyTorch computes it; errors as [`Self::validate`].
    pub fn output(&self) -> Result<[usize; 2]> {
        self.validate()?;
        Ok(self.output_unchecked())
    }

    /// Columns of the patch matrix: `c_in * kh * kw` (saturating; validated sizes fit).
    pub fn patch_dim(&self) -> usize {
        self.c_in
            .saturating_mul(self.kernel[0])
            .saturating_mul(self.kernel[1])
    }
}

/// A factor's input matrix read from a 4-d tensor: the patch matrix of a convolution over
/// `[batch, c_in, h, w]` (A factor), or with [`Patches::positions`] the output gradient's
/// positions as rows (G factor). Zero padding reads as 0; with `ones` a last column of ones
/// (a bias) follows the patch columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patches {
    /// The convolution.
    pub geometry: Conv2dGeometry,
    /// Samples in the tensor.
    pub batch: usize,
    /// Element strides of the tensor's `[n, c, h, w]` dimensions.
    pub strides: [usize; 4],
    /// Whether a ones column (a bias) follows the patch columns.
    pub ones: bool,
    /// Whether THOR's factor step normalises by the samples (`batch`, KFC's A factor)
    /// rather than by the rows (`batch * ho * wo`, the default); see the module docs.
    pub per_sample: bool,
}

/// How a factor's input matrix X is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLayout {
    /// Row-major `[rows, d]` with row stride `ld >= d`.
    Matrix {
        /// Rows (samples).
        rows: usize,
        /// Row stride in elements.
        ld: usize,
    },
    /// The rows and columns of [`Patches`], read from its tensor.
    Patches(Patches),
}

impl InputLayout {
    /// A row-major `[rows, d]` matrix with row stride `ld`.
    pub fn matrix(rows: usize, ld: usize) -> Self {
        InputLayout::Matrix { rows, ld }
    }

    /// Rows of the matrix (`N * Ho * Wo` for patches).
    pub fn rows(&self) -> usize {
        match self {
            InputLayout::Matrix { rows, .. } => *rows,
            InputLayout::Patches(p) => p.rows(),
        }
    }

    /// What THOR's factor step divides the product by: the rows, or the samples of
    /// patches normalised per sample ([`Patches::per_sample`]).
    pub fn samples(&self) -> usize {
        match self {
            InputLayout::Patches(p) if p.per_sample => p.batch,
            _ => self.rows(),
        }
    }

    /// Checks the layout for a factor of dimension `d` and returns how many elements the
    /// input must hold (0 for no rows). Errors name `ld` or the geometry's field.
    pub fn check(&self, d: usize) -> Result<usize> {
        match self {
            InputLayout::Matrix { rows, ld } => crate::layout::strided_len("ld", *rows, *ld, d),
            InputLayout::Patches(p) => {
                p.check_dim(d)?;
                p.span()
            }
        }
    }
}

impl Patches {
    /// The patch matrix of `geometry` over a contiguous `batch`-sample tensor in `layout`.
    pub fn new(geometry: Conv2dGeometry, batch: usize, layout: TensorLayout) -> Self {
        let g = &geometry;
        Self {
            geometry,
            batch,
            strides: layout.strides(g.c_in, g.h, g.w),
            ones: false,
            per_sample: false,
        }
    }

    /// The rows of a `[batch, channels, ho, wo]` tensor in `layout` taken position by
    /// position: `batch * ho * wo` rows of `channels` values (a conv layer's output
    /// gradient, for its G factor), without a transpose.
    pub fn positions(
        channels: usize,
        ho: usize,
        wo: usize,
        batch: usize,
        layout: TensorLayout,
    ) -> Self {
        Self::new(Conv2dGeometry::new(channels, ho, wo, [1, 1]), batch, layout)
    }

    /// With element strides `[n, c, h, w]` (a strided view).
    pub fn with_strides(mut self, strides: [usize; 4]) -> Self {
        self.strides = strides;
        self
    }

    /// With a ones column after the patch columns (a bias).
    pub fn with_ones(mut self, ones: bool) -> Self {
        self.ones = ones;
        self
    }

    /// Normalised by the samples rather than the rows in THOR's factor step.
    pub fn with_per_sample(mut self, per_sample: bool) -> Self {
        self.per_sample = per_sample;
        self
    }

    /// Rows: `batch * ho * wo` (saturating; checked by [`Self::validate`]).
    pub fn rows(&self) -> usize {
        let [ho, wo] = self.geometry.output_unchecked_or_zero();
        self.batch.saturating_mul(ho).saturating_mul(wo)
    }

    /// Columns: `c_in * kh * kw`, +1 with the ones column.
    pub fn dim(&self) -> usize {
        self.geometry.patch_dim().saturating_add(self.ones as usize)
    }

    /// Checks the geometry, the batch and the strides: the rows and the tensor's span
    /// countable, at most [`MAX_PATCH_ROWS`] rows.
    pub fn validate(&self) -> Result<()> {
        self.geometry.validate()?;
        if self.batch == 0 {
            return Err(Error::invalid("batch", "at least one sample is needed"));
        }
        let [ho, wo] = self.geometry.output_unchecked();
        // Rows capped as on the device, and the tensor's logical element count countable:
        // with broadcast (stride 0) dimensions neither follows from the memory it spans.
        self.batch
            .checked_mul(ho * wo)
            .filter(|&r| r <= MAX_PATCH_ROWS)
            .ok_or_else(|| {
                Error::invalid(
                    "batch",
                    format!("batch * ho * wo rows above {MAX_PATCH_ROWS} (2^30)"),
                )
            })?;
        let g = &self.geometry;
        self.batch
            .checked_mul(g.c_in)
            .and_then(|v| v.checked_mul(g.h))
            .and_then(|v| v.checked_mul(g.w))
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(|| Error::invalid("batch", "batch * c_in * h * w elements overflow"))?;
        self.span().map(|_| ())
    }

    /// Checks the patches against a factor of dimension `d` (then as [`Self::validate`]).
    pub fn check_dim(&self, d: usize) -> Result<()> {
        self.validate()?;
        if self.dim() != d {
            return Err(Error::shape(
                "patches",
                format!("{d} columns (the factor's dimension)"),
                format!(
                    "{} (c_in * kh * kw{})",
                    self.dim(),
                    if self.ones { " + 1" } else { "" }
                ),
            ));
        }
        Ok(())
    }

    /// Elements the tensor spans: one past its last element's offset. Errors when the
    /// offsets are not countable in 8-byte units.
    pub fn span(&self) -> Result<usize> {
        let g = &self.geometry;
        let extents = [self.batch, g.c_in, g.h, g.w];
        if let Some(i) = extents.iter().position(|&e| e == 0) {
            return Err(Error::invalid(
                ["batch", "c_in", "h", "w"][i],
                "must be at least 1",
            ));
        }
        let mut last = 0usize;
        for (i, (&e, &s)) in extents.iter().zip(&self.strides).enumerate() {
            last = e
                .checked_sub(1)
                .and_then(|e| e.checked_mul(s))
                .and_then(|v| v.checked_add(last))
                .ok_or_else(|| {
                    Error::invalid(
                        "strides",
                        format!("dimension {i}: {e} elements of stride {s} overflow"),
                    )
                })?;
        }
        last.checked_add(1)
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(|| Error::invalid("strides", "the tensor's span overflows"))
    }

    /// The offset of element `(row, col)` of the patch matrix in the tensor, `None` where it
    /// reads zero padding or the ones column (`col == c_in * kh * kw`). Requires a valid
    /// geometry and `row < rows()`, `col < dim()`.
    pub fn offset(&self, row: usize, col: usize) -> Option<usize> {
        let g = &self.geometry;
        let [ho, wo] = g.output_unchecked();
        let [kh, kw] = g.kernel;
        if col >= g.patch_dim() {
            return None;
        }
        let (n, p) = (row / (ho * wo), row % (ho * wo));
        let (oh, ow) = (p / wo, p % wo);
        let (ci, k) = (col / (kh * kw), col % (kh * kw));
        let (ki, kj) = (k / kw, k % kw);
        let hh = (oh * g.stride[0] + ki * g.dilation[0]).checked_sub(g.padding[0])?;
        let ww = (ow * g.stride[1] + kj * g.dilation[1]).checked_sub(g.padding[1])?;
        if hh >= g.h || ww >= g.w {
            return None;
        }
        let s = &self.strides;
        Some(n * s[0] + ci * s[1] + hh * s[2] + ww * s[3])
    }

    /// The value of element `(row, col)` from tensor `x` (0 in the padding, 1 in the ones
    /// column). Requires what [`Self::offset`] does and `x` at least [`Self::span`] long.
    pub fn value<E: crate::Element>(&self, x: &[E], row: usize, col: usize) -> f32 {
        match self.offset(row, col) {
            Some(o) => x[o].to_f32(),
            None if col == self.geometry.patch_dim() => 1.0,
            None => 0.0,
        }
    }

    /// The offset of an element that some row of the patch matrix reads and `ok` rejects,
    /// if any (requires a valid geometry and `x` at least [`Self::span`] long). Planes
    /// `(n, c)` in parallel; which input rows and columns are read is worked out once per
    /// call (on the stack for sizes up to 4096, per element beyond).
    pub(crate) fn find_read<E: crate::Element + Sync>(
        &self,
        x: &[E],
        ok: impl Fn(&E) -> bool + Sync,
    ) -> Option<usize> {
        use rayon::prelude::*;
        const MAX: usize = 4096;
        let g = &self.geometry;
        let [ho, wo] = g.output_unchecked();
        let read = |i: usize, extent_out: usize, v: usize| -> bool {
            // v = o * stride + k * dilation - padding for some o < extent_out, k < kernel.
            (0..g.kernel[i]).any(|k| {
                let t = v + g.padding[i];
                let kd = k * g.dilation[i];
                t >= kd && (t - kd) % g.stride[i] == 0 && (t - kd) / g.stride[i] < extent_out
            })
        };
        let (mut rows, mut cols) = ([false; MAX], [false; MAX]);
        let small = g.h <= MAX && g.w <= MAX;
        if small {
            for (v, r) in rows.iter_mut().enumerate().take(g.h) {
                *r = read(0, ho, v);
            }
            for (v, r) in cols.iter_mut().enumerate().take(g.w) {
                *r = read(1, wo, v);
            }
        }
        let read_h = |v: usize| if small { rows[v] } else { read(0, ho, v) };
        let read_w = |v: usize| if small { cols[v] } else { read(1, wo, v) };
        let s = &self.strides;
        (0..self.batch * g.c_in)
            .into_par_iter()
            .find_map_first(|nc| {
                let base = (nc / g.c_in) * s[0] + (nc % g.c_in) * s[1];
                (0..g.h).filter(|&h| read_h(h)).find_map(|h| {
                    (0..g.w)
                        .filter(|&w| read_w(w))
                        .map(|w| base + h * s[2] + w * s[3])
                        .find(|&o| !ok(&x[o]))
                })
            })
    }
}

impl Conv2dGeometry {
    /// The output size, 0 where the kernel does not fit (no check, no overflow).
    pub(crate) fn output_unchecked_or_zero(&self) -> [usize; 2] {
        [0, 1].map(|i| {
            let extent = [self.h, self.w][i].saturating_add(self.padding[i].saturating_mul(2));
            let span = self.kernel[i]
                .saturating_sub(1)
                .saturating_mul(self.dilation[i])
                .saturating_add(1);
            match extent.checked_sub(span) {
                Some(room) if self.stride[i] > 0 && self.kernel[i] > 0 => room / self.stride[i] + 1,
                _ => 0,
            }
        })
    }
}

impl Patches {
    /// Writes rows `r0 .. r0 + n`, columns `col0 .. col0 + w` of the patch matrix to `dst`
    /// column by column (column-major `n x w`: consecutive rows are consecutive output
    /// positions, so each run along an output row reads the tensor at a fixed stride).
    /// Requires a valid geometry, the rows and columns in range and `x` at least
    /// [`Self::span`] long.
    pub(crate) fn fill_columns<E: crate::Element>(
        &self,
        x: &[E],
        r0: usize,
        n: usize,
        col0: usize,
        w: usize,
        dst: &mut [f32],
    ) {
        let g = &self.geometry;
        let [ho, wo] = g.output_unchecked();
        let [kh, kw] = g.kernel;
        let (pd, s) = (g.patch_dim(), self.strides);
        for (c, out) in dst.chunks_exact_mut(n).take(w).enumerate() {
            let col = col0 + c;
            if col >= pd {
                out.fill(1.0);
                continue;
            }
            let (ci, k) = (col / (kh * kw), col % (kh * kw));
            let (ki, kj) = (k / kw, k % kw);
            let dh = (ki * g.dilation[0]) as isize - g.padding[0] as isize;
            let dw = (kj * g.dilation[1]) as isize - g.padding[1] as isize;
            // The t in 0..run where ww = first + t * sw is inside the input, as lo..hi.
            let (sw, width) = (g.stride[1] as isize, g.w as isize);
            let inside = |first: isize, run: usize| {
                let lo = if first >= 0 {
                    0
                } else {
                    (-first + sw - 1) / sw
                } as usize;
                let lo = lo.min(run);
                let hi = if first >= width {
                    0
                } else {
                    (width - first + sw - 1) / sw
                } as usize;
                (lo, hi.clamp(lo, run))
            };
            let full = inside(dw, wo);
            let (mut b, p) = (r0 / (ho * wo), r0 % (ho * wo));
            let (mut oh, mut ow) = (p / wo, p % wo);
            let mut i = 0;
            while i < n {
                // A run along one output row: the same sample and input row.
                let run = (wo - ow).min(n - i);
                let seg = &mut out[i..i + run];
                let hh = (oh * g.stride[0]) as isize + dh;
                if hh < 0 || hh as usize >= g.h {
                    seg.fill(0.0);
                } else {
                    // ww(t) = (ow + t) * sw + dw: inside the input for t in lo..hi, a
                    // strided read there and zeros around it.
                    let first = ow as isize * sw + dw;
                    let (lo, hi) = if ow == 0 && run == wo {
                        full
                    } else {
                        inside(first, run)
                    };
                    seg[..lo].fill(0.0);
                    seg[hi..].fill(0.0);
                    if hi > lo {
                        let start = b * s[0]
                            + ci * s[1]
                            + hh as usize * s[2]
                            + (first + lo as isize * sw) as usize * s[3];
                        // Wrapping: past one element a run's step lies inside the span, so
                        // it can only wrap when at most one element is read.
                        let step = s[3].wrapping_mul(sw as usize);
                        if step == 0 {
                            // A broadcast width (stride 0): one element throughout.
                            seg[lo..hi].fill(x[start].to_f32());
                        } else {
                            let src = x[start..].iter().step_by(step);
                            for (o, v) in seg[lo..hi].iter_mut().zip(src) {
                                *o = v.to_f32();
                            }
                        }
                    }
                }
                i += run;
                ow += run;
                if ow == wo {
                    ow = 0;
                    oh += 1;
                    if oh == ho {
                        oh = 0;
                        b += 1;
                    }
                }
            }
        }
    }
}
