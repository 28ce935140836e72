//! The CPU backend: f32 compute, parallel over blocks with rayon, dense per-block math
//! through faer. Used when there is no GPU, and as a fast second opinion in tests.
//!
//! Every operation validates all of its arguments before it writes anything: on error the
//! caller's buffers are unchanged. Operations that need scratch memory take a
//! [`Workspace`] sized by their `*_workspace_size` query and never allocate.

pub mod step;
mod workspace;

pub use workspace::Workspace;

use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::triangular::BlockStructure;
use faer::linalg::matmul::{matmul, triangular};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::dtype::Element;
use crate::error::{check_finite, check_len, check_min_len, product, Error, Result};
use crate::layout::{check_block_size, strided_len, BlockLayout, FactorSet};
use crate::patches::InputLayout;
use crate::rule::{FACTOR_FROZEN, FACTOR_HAS_STATS};
use workspace::{for_each_group, workspace_size, PerItem};

pub use crate::invert::{check_info, FailurePolicy, INFO_BAD_DAMPING, INFO_SKIPPED};

/// Rows of an f16 / bf16 input or of conv patches converted to f32 at a time by
/// [`accumulate_input`].
const ACCUMULATE_CHUNK_ROWS: usize = 256;

/// Finds the first non-finite element of a row-major `rows x cols` view with row stride `ld`.
fn find_non_finite<E: Element>(
    x: &[E],
    rows: usize,
    cols: usize,
    ld: usize,
) -> Option<(usize, usize)> {
    (0..rows).into_par_iter().find_map_first(|r| {
        x[r * ld..r * ld + cols]
            .iter()
            .position(|v| !v.to_f32().is_finite())
            .map(|c| (r, c))
    })
}

fn non_finite_error(arg: &'static str, at: (usize, usize)) -> Error {
    Error::invalid(
        arg,
        format!("non-finite value at row {}, column {}", at.0, at.1),
    )
}

/// Splits a dense row-major `d x d` factor (row stride `ld >= d`) into its padded diagonal
/// blocks, `out` being `[nb, b, b]`. Rows and columns past `d` are identity.
///
/// A pure copy, as on the GPU: non-finite values are copied, not reported (the THOR step
/// catches them where they enter, in the accumulation's per-factor status). Errors on
/// shape mismatches only.
pub fn split(dense: &[f32], ld: usize, layout: &BlockLayout, out: &mut [f32]) -> Result<()> {
    let b = layout.block();
    check_min_len("dense", layout.dense_len(ld)?, dense.len())?;
    check_len("out", layout.buffer_len(), out.len())?;
    out.par_chunks_mut(b * b).enumerate().for_each(|(j, s)| {
        let w = layout.valid(j);
        for (r, row) in s.chunks_exact_mut(b).enumerate() {
            row.fill(0.0);
            if r < w {
                let src = (j * b + r) * ld + j * b;
                row[..w].copy_from_slice(&dense[src..src + w]);
            } else {
                row[r] = 1.0;
            }
        }
    });
    Ok(())
}

/// Merges `[nb, b, b]` diagonal blocks back into a dense row-major `d x d` matrix (row
/// stride `ld >= d`): the block-diagonal entries from the blocks, zero elsewhere.
pub fn merge(blocks: &[f32], layout: &BlockLayout, dense: &mut [f32], ld: usize) -> Result<()> {
    let (d, b) = (layout.dim(), layout.block());
    let len = layout.dense_len(ld)?;
    check_len("blocks", layout.buffer_len(), blocks.len())?;
    check_min_len("dense", len, dense.len())?;
    let dense = &mut dense[..len];
    dense.par_chunks_mut(ld).enumerate().for_each(|(gr, row)| {
        let j = gr / b;
        let w = layout.valid(j);
        let row = &mut row[..d];
        row.fill(0.0);
        let src = j * b * b + (gr % b) * b;
        row[j * b..j * b + w].copy_from_slice(&blocks[src..src + w]);
    });
    Ok(())
}

/// Traces of every block of a set (`block_traces`, padding included) and of every factor
/// (`factor_traces`, the factor's real diagonal only), in one pass. As on the GPU, a
/// non-finite diagonal gives a non-finite trace (the trace rule then reuses), not an error.
pub fn traces(
    set: &FactorSet,
    blocks: &[f32],
    block_traces: &mut [f32],
    factor_traces: &mut [f32],
) -> Result<()> {
    let b = set.block();
    check_len("blocks", set.buffer_len(), blocks.len())?;
    check_len("block_traces", set.total_blocks(), block_traces.len())?;
    check_len("factor_traces", set.len(), factor_traces.len())?;
    let diag = |blk: usize, i: usize| blocks[blk * b * b + i * b + i];
    block_traces
        .par_iter_mut()
        .enumerate()
        .for_each(|(blk, t)| *t = (0..b).map(|i| diag(blk, i)).sum());
    factor_traces
        .par_iter_mut()
        .zip(set.entries())
        .for_each(|(t, e)| {
            let sum: f64 = (0..e.layout.dim())
                .map(|i| diag(e.first_block + i / b, i % b) as f64)
                .sum();
            *t = sum as f32;
        });
    Ok(())
}

/// Workspace bytes [`accumulate`] and [`accumulate_input`] need for inputs of type `E`
/// with this layout (f16 / bf16 rows and conv patches are widened to f32 a chunk of rows
/// at a time; an f32 matrix is read in place and needs none).
pub fn accumulate_workspace_size<E: Element>(layout: &BlockLayout) -> usize {
    workspace_size(ACCUMULATE_CHUNK_ROWS * layout.block() * 4, layout.blocks())
}

/// Fused covariance accumulation into the block layout: for every diagonal block `j`,
/// `S_j <- beta * S_j + alpha * X_j^T X_j`, with `X_j` the j-th `b`-column slice of the
/// row-major `rows x d` input `x` (row stride `ld >= d`). Padding is set to identity and
/// `block_traces[j]` receives the trace of the updated block (padding included).
///
/// Each symmetric block is computed once (lower triangle) and mirrored. f16 and bf16
/// inputs are widened to f32 in chunks of rows; accumulation is f32.
///
/// Errors on shape mismatches, `rows == 0`, non-finite `alpha` / `beta`, a non-finite
/// element of `x`, or a workspace smaller than [`accumulate_workspace_size`].
#[allow(clippy::too_many_arguments)]
pub fn accumulate<E: Element>(
    x: &[E],
    rows: usize,
    ld: usize,
    layout: &BlockLayout,
    alpha: f32,
    beta: f32,
    blocks: &mut [f32],
    block_traces: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let input = InputLayout::matrix(rows, ld);
    accumulate_input(x, &input, layout, alpha, beta, blocks, block_traces, ws)
}

/// [`accumulate`] with X described by `input`: a row-major matrix, or the patch matrix of
/// a convolution read straight from its 4-d input tensor ([`Patches`](crate::patches::Patches); implicit im2col,
/// a chunk of rows per block at a time, never the whole matrix). A non-finite element that
/// X reads is an error (elements of the tensor that no patch reads are not looked at).
#[allow(clippy::too_many_arguments)]
pub fn accumulate_input<E: Element>(
    x: &[E],
    input: &InputLayout,
    layout: &BlockLayout,
    alpha: f32,
    beta: f32,
    blocks: &mut [f32],
    block_traces: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let (d, b) = (layout.dim(), layout.block());
    let x_len = input.check(d)?;
    let rows = input.rows();
    if rows == 0 {
        return Err(Error::invalid("rows", "at least one row is needed"));
    }
    check_finite("alpha", alpha as f64)?;
    check_finite("beta", beta as f64)?;
    check_min_len("x", x_len, x.len())?;
    check_len("blocks", layout.buffer_len(), blocks.len())?;
    check_len("block_traces", layout.blocks(), block_traces.len())?;
    let need = accumulate_workspace_size::<E>(layout);
    // f32 matrices are read in place; everything else goes through chunks of f32 rows.
    let direct =
        E::DTYPE == crate::dtype::DType::F32 && matches!(input, InputLayout::Matrix { .. });
    let per_slot = if direct {
        0
    } else {
        ACCUMULATE_CHUNK_ROWS * b * 4
    };
    if !direct && ws.len() < workspace::slot_bytes(per_slot) {
        return Err(Error::shape(
            "workspace",
            format!("at least {need} bytes"),
            format!("{} bytes", ws.len()),
        ));
    }
    if let Some(e) = input_non_finite(x, input, d) {
        return Err(e);
    }
    let none = PerItem(&mut [0u8][..0], 0);
    for_each_group(
        (PerItem(blocks, b * b), PerItem(block_traces, 1), none),
        layout.blocks(),
        ws,
        per_slot,
        |range, out, tr, _, stack| {
            for (k, j) in range.enumerate() {
                let s = &mut out[k * b * b..(k + 1) * b * b];
                let w = layout.valid(j);
                let mut sm = MatMut::from_row_major_slice_mut(s, b, b);
                let mut sw = sm.rb_mut().submatrix_mut(0, 0, w, w);
                // Lower triangle: S <- beta * S, then S += alpha * X_j^T X_j.
                for c in 0..w {
                    for r in c..w {
                        sw[(r, c)] = if beta == 0.0 { 0.0 } else { beta * sw[(r, c)] };
                    }
                }
                let col0 = j * b;
                match input {
                    InputLayout::Matrix { ld, .. } if E::DTYPE == crate::dtype::DType::F32 => {
                        // SAFETY: E is f32 (checked through its DTYPE); the sealed trait
                        // admits exactly one type with that DTYPE, so the cast is an identity.
                        let xf: &[f32] =
                            unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) };
                        let xj =
                            MatRef::from_row_major_slice_with_stride(&xf[col0..], rows, w, *ld);
                        syrk_lower(sw.rb_mut(), xj, alpha);
                    }
                    _ => {
                        let (mut chunk, _) =
                            stack.make_with::<f32>(ACCUMULATE_CHUNK_ROWS * w, |_| 0.0);
                        let mut r0 = 0;
                        while r0 < rows {
                            let n = ACCUMULATE_CHUNK_ROWS.min(rows - r0);
                            let xc = fill_rows(x, input, r0, n, col0, w, &mut chunk);
                            syrk_lower(sw.rb_mut(), xc, alpha);
                            r0 += n;
                        }
                    }
                }
                mirror_and_pad(s, b, w);
                tr[k] = (0..b).map(|i| s[i * b + i]).sum();
            }
        },
    )
}

/// Rows `r0 .. r0 + n`, columns `col0 .. col0 + w` of X as f32 in `dst`, returned as a
/// matrix view (row-major for a matrix input, column-major for patches).
fn fill_rows<'a, E: Element>(
    x: &[E],
    input: &InputLayout,
    r0: usize,
    n: usize,
    col0: usize,
    w: usize,
    dst: &'a mut [f32],
) -> MatRef<'a, f32> {
    match input {
        InputLayout::Matrix { ld, .. } => {
            for (i, out) in dst.chunks_exact_mut(w).take(n).enumerate() {
                let src = &x[(r0 + i) * ld + col0..(r0 + i) * ld + col0 + w];
                for (o, v) in out.iter_mut().zip(src) {
                    *o = v.to_f32();
                }
            }
            MatRef::from_row_major_slice(&dst[..n * w], n, w)
        }
        InputLayout::Patches(p) => {
            p.fill_columns(x, r0, n, col0, w, dst);
            MatRef::from_column_major_slice(&dst[..n * w], n, w)
        }
    }
}

/// The error for the first non-finite element X reads, if any (`input` checked).
fn input_non_finite<E: Element>(x: &[E], input: &InputLayout, d: usize) -> Option<Error> {
    match input {
        InputLayout::Matrix { rows, ld } => {
            find_non_finite(x, *rows, d, *ld).map(|at| non_finite_error("x", at))
        }
        InputLayout::Patches(p) => p.find_read(x, |v| v.to_f32().is_finite()).map(|o| {
            Error::invalid(
                "x",
                format!("non-finite value at element {o} of the tensor"),
            )
        }),
    }
}

/// One factor's input for [`accumulate_set`].
#[derive(Debug, Clone, Copy)]
pub struct FactorInput<'a, E> {
    /// The elements X is read from.
    pub x: &'a [E],
    /// How X lies in `x`: a row-major matrix or a convolution's patches.
    pub layout: InputLayout,
    /// Scale of the new product.
    pub alpha: f32,
    /// Scale of the old statistics (0 replaces them).
    pub beta: f32,
}

/// Workspace bytes [`accumulate_set`] needs for inputs of type `E`.
pub fn accumulate_set_workspace_size<E: Element>(set: &FactorSet) -> usize {
    set.entries()
        .iter()
        .map(|e| accumulate_workspace_size::<E>(&e.layout))
        .max()
        .unwrap_or(0)
}

/// Grouped covariance accumulation, the CPU form of the device's grouped call: every
/// factor `f` of `set` from `inputs[f]` as in [`accumulate`], then the traces of every block
/// and factor. A factor whose input holds a NaN or Inf is left as it was and gets
/// `status[f] = 1`; with `partners` (as [`crate::cuda::accumulate::AccumulatePlan::set_partners`]),
/// a factor whose partner's input does is left as it was too, with `status[f] = 2`; 0
/// otherwise, as on the device. With `factor_state` (one byte per factor, kept by a factor
/// step's rule, see [`crate::rule::FACTOR_HAS_STATS`]) a frozen factor is neither read nor
/// written (`status[f] = 3`) and a factor without statistics has them replaced (alpha
/// `1 / rows`, or `1 / batch` for patches normalised per sample, beta 0) whatever its
/// input's alpha and beta. Other errors (shapes, scalars)
/// return before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_set<E: Element>(
    set: &FactorSet,
    inputs: &[FactorInput<'_, E>],
    partners: Option<&[Option<usize>]>,
    factor_state: Option<&[u8]>,
    blocks: &mut [f32],
    block_traces: &mut [f32],
    factor_traces: &mut [f32],
    status: &mut [i32],
    ws: &mut Workspace,
) -> Result<()> {
    check_len("inputs", set.len(), inputs.len())?;
    accumulate_set_with(
        set,
        |f| inputs[f],
        partners,
        factor_state,
        blocks,
        block_traces,
        factor_traces,
        status,
        ws,
    )
}

/// [`accumulate_set`] with factor `f`'s input from `input(f)`: allocates nothing (the
/// statuses double as the non-finite flags).
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate_set_with<'a, E: Element>(
    set: &FactorSet,
    input: impl Fn(usize) -> FactorInput<'a, E>,
    partners: Option<&[Option<usize>]>,
    factor_state: Option<&[u8]>,
    blocks: &mut [f32],
    block_traces: &mut [f32],
    factor_traces: &mut [f32],
    status: &mut [i32],
    ws: &mut Workspace,
) -> Result<()> {
    check_len("blocks", set.buffer_len(), blocks.len())?;
    check_len("block_traces", set.total_blocks(), block_traces.len())?;
    check_len("factor_traces", set.len(), factor_traces.len())?;
    check_len("status", set.len(), status.len())?;
    for (f, e) in set.entries().iter().enumerate() {
        let inp = input(f);
        let d = e.layout.dim();
        let x_len = inp.layout.check(d)?;
        if inp.layout.rows() == 0 {
            return Err(Error::invalid("rows", "at least one row is needed"));
        }
        check_finite("alpha", inp.alpha as f64)?;
        check_finite("beta", inp.beta as f64)?;
        check_min_len("x", x_len, inp.x.len())?;
    }
    if let Some(p) = partners {
        check_len("partners", set.len(), p.len())?;
        if let Some(f) = p
            .iter()
            .enumerate()
            .position(|(f, q)| q.is_some_and(|q| q == f || q >= set.len()))
        {
            return Err(Error::invalid(
                "partners",
                format!("factor {f}: partner is itself or not in the set"),
            ));
        }
    }
    if let Some(st) = factor_state {
        check_len("factor_state", set.len(), st.len())?;
    }
    let need = accumulate_set_workspace_size::<E>(set);
    // One slot is what every factor's accumulation needs at the least (as it checks).
    let chunked = E::DTYPE != crate::dtype::DType::F32
        || (0..set.len()).any(|f| matches!(input(f).layout, InputLayout::Patches(_)));
    if chunked && ws.len() < workspace::slot_bytes(ACCUMULATE_CHUNK_ROWS * set.block() * 4) {
        return Err(Error::shape(
            "workspace",
            format!("at least {need} bytes (accumulate_set_workspace_size)"),
            format!("{} bytes", ws.len()),
        ));
    }
    let state = |f: usize| factor_state.map_or(FACTOR_HAS_STATS, |s| s[f]);
    // Statuses: 3 frozen, 1 non-finite input, then 2 where the partner's input is not
    // finite (only 0 becomes 2, so the order of the factors does not matter), 0 otherwise.
    for (f, e) in set.entries().iter().enumerate() {
        let inp = input(f);
        status[f] = if state(f) & FACTOR_FROZEN != 0 {
            3
        } else if input_non_finite(inp.x, &inp.layout, e.layout.dim()).is_some() {
            1
        } else {
            0
        };
    }
    if let Some(p) = partners {
        for f in 0..set.len() {
            if status[f] == 0 && p[f].is_some_and(|q| status[q] == 1) {
                status[f] = 2;
            }
        }
    }
    for (f, e) in set.entries().iter().enumerate() {
        if status[f] != 0 {
            continue;
        }
        let inp = input(f);
        let (alpha, beta) = if state(f) & FACTOR_HAS_STATS == 0 {
            (1.0 / inp.layout.samples() as f32, 0.0)
        } else {
            (inp.alpha, inp.beta)
        };
        let range = e.offset()..e.offset() + e.layout.buffer_len();
        let bt = &mut block_traces[e.first_block..e.first_block + e.layout.blocks()];
        accumulate_input(
            inp.x,
            &inp.layout,
            &e.layout,
            alpha,
            beta,
            &mut blocks[range],
            bt,
            ws,
        )?;
    }
    // Traces of the kept factors too (their blocks as they were, assumed finite).
    let b = set.block();
    for (f, e) in set.entries().iter().enumerate() {
        let mut sum = 0.0f64;
        for j in 0..e.layout.blocks() {
            let k = e.first_block + j;
            let blk = &blocks[k * b * b..(k + 1) * b * b];
            block_traces[k] = (0..b).map(|i| blk[i * b + i]).sum();
            sum += (0..e.layout.valid(j))
                .map(|i| blk[i * b + i] as f64)
                .sum::<f64>();
        }
        factor_traces[f] = sum as f32;
    }
    Ok(())
}

/// Dense covariance accumulation for users who keep whole factors (no splitting): the
/// lower triangle (row-major) of the `d x d` matrix `c` (row stride `ldc >= d`) becomes
/// `beta * C + alpha * X^T X`, `X` being `rows x d` row-major with row stride `ld`; the
/// strict upper triangle is not touched (SYRK's contract, as on the GPU). With `beta == 0`
/// the old values are not read. faer's triangular product, parallel over the machine.
///
/// Errors on shape mismatches, `rows == 0`, non-finite `alpha` / `beta` or a non-finite
/// element of `x` (nothing is written then).
#[allow(clippy::too_many_arguments)]
pub fn accumulate_dense(
    x: &[f32],
    rows: usize,
    ld: usize,
    d: usize,
    alpha: f32,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> Result<()> {
    if rows == 0 || d == 0 {
        return Err(Error::invalid("rows/d", "must be at least 1"));
    }
    let x_len = strided_len("ld", rows, ld, d)?;
    let c_len = strided_len("ldc", d, ldc, d)?;
    check_finite("alpha", alpha as f64)?;
    check_finite("beta", beta as f64)?;
    check_min_len("x", x_len, x.len())?;
    check_min_len("c", c_len, c.len())?;
    if let Some(at) = find_non_finite(x, rows, d, ld) {
        return Err(non_finite_error("x", at));
    }
    let len = c_len;
    // Row-major C with stride ldc is the transpose of a column-major view.
    let mut cm =
        MatMut::from_column_major_slice_with_stride_mut(&mut c[..len], d, d, ldc).transpose_mut();
    for r in 0..d {
        for col in 0..=r {
            cm[(r, col)] = if beta == 0.0 {
                0.0
            } else {
                beta * cm[(r, col)]
            };
        }
    }
    let xm = MatRef::from_row_major_slice_with_stride(&x[..x_len], rows, d, ld);
    triangular::matmul(
        cm,
        BlockStructure::TriangularLower,
        Accum::Add,
        xm.transpose(),
        BlockStructure::Rectangular,
        xm,
        BlockStructure::Rectangular,
        alpha,
        Par::rayon(0),
    );
    Ok(())
}

/// `dst(lower) += alpha * x^T x`.
fn syrk_lower(dst: MatMut<'_, f32>, x: MatRef<'_, f32>, alpha: f32) {
    triangular::matmul(
        dst,
        BlockStructure::TriangularLower,
        Accum::Add,
        x.transpose(),
        BlockStructure::Rectangular,
        x,
        BlockStructure::Rectangular,
        alpha,
        Par::Seq,
    );
}

/// Copies the lower triangle of the top-left `w x w` of a `b x b` block to its upper
/// triangle (bit for bit) and sets everything past `w` to identity.
pub(crate) fn mirror_and_pad(s: &mut [f32], b: usize, w: usize) {
    for r in 0..b {
        for c in r + 1..b {
            s[r * b + c] = if c < w { s[c * b + r] } else { 0.0 };
        }
        if r >= w {
            for c in 0..r {
                s[r * b + c] = 0.0;
            }
            s[r * b + r] = 1.0;
        }
    }
}

/// Damping for [`invert`]: one value for every block, or one per block.
#[derive(Debug, Clone, Copy)]
pub enum Damping<'a> {
    /// The same damping for every block.
    Uniform(f32),
    /// `damping[j]` for block `j` (see [`FactorSet::damping_per_block`]).
    PerBlock(&'a [f32]),
}

impl Damping<'_> {
    pub(crate) fn validate(&self, blocks: usize) -> Result<()> {
        let check = |v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    "damping",
                    format!("must be finite and >= 0, got {v}"),
                ))
            }
        };
        match *self {
            Damping::Uniform(v) => check(v),
            // Per-block values are data: a bad one marks its block (info
            // INFO_BAD_DAMPING), as on the device.
            Damping::PerBlock(d) => check_len("damping", blocks, d.len()),
        }
    }

    pub(crate) fn get(&self, j: usize) -> f32 {
        match *self {
            Damping::Uniform(v) => v,
            Damping::PerBlock(d) => d[j],
        }
    }
}

/// Options of [`invert`]: damping, an optional mask and the failure policy.
#[derive(Debug, Clone, Copy)]
pub struct InvertOptions<'a> {
    /// Damping added to the diagonal before factoring.
    pub damping: Damping<'a>,
    /// One byte per block: 0 skips the block (output untouched, info [`INFO_SKIPPED`]).
    pub mask: Option<&'a [u8]>,
    /// What to do with blocks that are not positive definite.
    pub policy: FailurePolicy,
}

impl<'a> InvertOptions<'a> {
    /// Uniform damping, no mask, report failures.
    pub fn uniform(damping: f32) -> Self {
        Self {
            damping: Damping::Uniform(damping),
            mask: None,
            policy: FailurePolicy::Report,
        }
    }

    /// Per-block damping, no mask, report failures.
    pub fn per_block(damping: &'a [f32]) -> Self {
        Self {
            damping: Damping::PerBlock(damping),
            mask: None,
            policy: FailurePolicy::Report,
        }
    }
}

fn invert_stack_req(b: usize) -> StackReq {
    StackReq::new::<f32>(b * b)
        .and(llt::factor::cholesky_in_place_scratch::<f32>(
            b,
            Par::Seq,
            Default::default(),
        ))
        .and(llt::inverse::inverse_scratch::<f32>(b, Par::Seq))
}

/// Workspace bytes [`invert`] needs for `blocks` blocks of `b x b`.
pub fn invert_workspace_size(b: usize, blocks: usize) -> usize {
    workspace_size(invert_stack_req(b).unaligned_bytes_required(), blocks)
}

/// Batched damped Cholesky inversion: for every `b x b` block `j` of `input` (`[nb, b, b]`,
/// `nb = info.len()`), `out_j = (S_j + l_j I)^-1` through `S + l I = L L^T`, `L^-1`,
/// `L^-T L^-1`, written as a full symmetric block (lower triangle computed, mirrored bit for
/// bit). Reads the lower triangle of each input block only.
///
/// `info[j]` receives 0, the LAPACK-style 1-based pivot that was not positive and finite (a
/// non-SPD, NaN or Inf block, after any retries), or [`INFO_SKIPPED`] for a masked block.
/// A block that fails or is skipped keeps its output as it was before the call.
/// `damping_used[j]`, when given, receives the damping of the block's last attempt.
/// Use [`check_info`] to turn a failure into an error.
pub fn invert(
    b: usize,
    input: &[f32],
    out: &mut [f32],
    info: &mut [i32],
    damping_used: Option<&mut [f32]>,
    opts: &InvertOptions<'_>,
    ws: &mut Workspace,
) -> Result<()> {
    check_block_size(b)?;
    let nb = info.len();
    check_len("input", nb * b * b, input.len())?;
    check_len("out", nb * b * b, out.len())?;
    invert_impl(b, Some(input), out, info, damping_used, opts, ws)
}

/// [`invert`] in place: `blocks` is overwritten with the inverses, except failed and
/// skipped blocks, which keep their input values.
pub fn invert_in_place(
    b: usize,
    blocks: &mut [f32],
    info: &mut [i32],
    damping_used: Option<&mut [f32]>,
    opts: &InvertOptions<'_>,
    ws: &mut Workspace,
) -> Result<()> {
    check_block_size(b)?;
    check_len("blocks", info.len() * b * b, blocks.len())?;
    invert_impl(b, None, blocks, info, damping_used, opts, ws)
}

fn invert_impl(
    b: usize,
    input: Option<&[f32]>,
    out: &mut [f32],
    info: &mut [i32],
    damping_used: Option<&mut [f32]>,
    opts: &InvertOptions<'_>,
    ws: &mut Workspace,
) -> Result<()> {
    let nb = info.len();
    if nb == 0 {
        return Err(Error::invalid("info", "at least one block is needed"));
    }
    opts.damping.validate(nb)?;
    let (max_retries, factor, floor) = opts.policy.params()?;
    if let Some(m) = opts.mask {
        check_len("mask", nb, m.len())?;
    }
    let used = match damping_used {
        Some(d) => {
            check_len("damping_used", nb, d.len())?;
            PerItem(d, 1)
        }
        None => PerItem(&mut [][..], 0),
    };
    let req = invert_stack_req(b);
    for_each_group(
        (PerItem(out, b * b), PerItem(info, 1), used),
        nb,
        ws,
        req.unaligned_bytes_required(),
        |range, o, inf, used, stack| {
            for (k, j) in range.enumerate() {
                if opts.mask.is_some_and(|m| m[j] == 0) {
                    inf[k] = INFO_SKIPPED;
                    continue;
                }
                let dst = &mut o[k * b * b..(k + 1) * b * b];
                let src: &[f32] = match input {
                    Some(inp) => &inp[j * b * b..(j + 1) * b * b],
                    None => dst,
                };
                let mut lam = opts.damping.get(j);
                if !(lam >= 0.0 && lam.is_finite()) {
                    inf[k] = INFO_BAD_DAMPING;
                    continue;
                }
                let (mut l, stack) = stack.make_with::<f32>(b * b, |_| 0.0);
                let mut pivot = factor_block(src, b, lam, &mut l, stack);
                for _ in 0..max_retries {
                    if pivot == 0 {
                        break;
                    }
                    lam = lam.max(floor) * factor;
                    pivot = factor_block(src, b, lam, &mut l, stack);
                }
                inf[k] = pivot as i32;
                if let Some(u) = used.get_mut(k) {
                    *u = lam;
                }
                if pivot == 0 {
                    let lref = MatRef::from_row_major_slice(&l, b, b);
                    let mut x = MatMut::from_row_major_slice_mut(dst, b, b);
                    llt::inverse::inverse(x.rb_mut(), lref, Par::Seq, stack);
                    // faer writes the lower triangle; mirror it.
                    for r in 0..b {
                        for c in r + 1..b {
                            dst[r * b + c] = dst[c * b + r];
                        }
                    }
                }
            }
        },
    )
}

/// Copies the damped lower triangle of `src` into `l` and factors it. Returns 0, or the
/// 1-based pivot that was not positive and finite.
fn factor_block(src: &[f32], b: usize, damping: f32, l: &mut [f32], stack: &mut MemStack) -> usize {
    // A non-finite entry in row r of the lower triangle makes pivot r + 1 non-finite in exact
    // Cholesky arithmetic, unless an earlier pivot fails first; factor the finite leading
    // part to find out which.
    let bad_row = (0..b).find(|&r| (0..=r).any(|c| !src[r * b + c].is_finite()));
    let n = bad_row.unwrap_or(b);
    for r in 0..b {
        for c in 0..b {
            l[r * b + c] = if c <= r { src[r * b + c] } else { 0.0 };
        }
        l[r * b + r] += damping;
    }
    if n > 0 {
        let lm = MatMut::from_row_major_slice_mut(l, b, b).submatrix_mut(0, 0, n, n);
        match llt::factor::cholesky_in_place(
            lm,
            Default::default(),
            Par::Seq,
            stack,
            Default::default(),
        ) {
            Err(llt::factor::LltError::NonPositivePivot { index }) => return index + 1,
            Ok(_) => {
                if let Some(p) = (0..n).find(|&i| !(l[i * b + i] > 0.0 && l[i * b + i].is_finite()))
                {
                    return p + 1;
                }
            }
        }
    }
    match bad_row {
        Some(r) => r + 1,
        None => 0,
    }
}

/// Workspace bytes [`apply`] needs for a gradient of `out_dim x in_dim` whose output side
/// is split at `g_block` (or processed in panels of 128 rows when there is no G side).
/// Saturates at `usize::MAX` for shapes no memory holds, so that [`Workspace::try_new`]
/// reports them.
pub fn apply_workspace_size(g_block: Option<usize>, out_dim: usize, in_dim: usize) -> usize {
    let rb = g_block.unwrap_or(128).max(1);
    // Saturating: a size no memory holds stays one (Workspace::try_new then fails).
    workspace_size(
        rb.saturating_mul(in_dim).saturating_mul(4),
        out_dim.div_ceil(rb),
    )
}

/// The preconditioner apply for one layer:
/// `out = scale * blockdiag(G^-1) * grad * blockdiag(A^-1)`.
///
/// `grad` and `out` are row-major `[out_dim, in_dim]`. `g_inv` holds the inverse blocks of
/// the output-side factor (dimension `out_dim`), `a_inv` those of the input-side factor
/// (dimension `in_dim`); a side given as `None` is the identity. Padding never touches the
/// gradient: each inverse block is used cropped to its real rows and columns.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    g_inv: Option<(&BlockLayout, &[f32])>,
    grad: &[f32],
    a_inv: Option<(&BlockLayout, &[f32])>,
    out_dim: usize,
    in_dim: usize,
    scale: f32,
    out: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    if out_dim == 0 || in_dim == 0 {
        return Err(Error::invalid(
            "out_dim/in_dim",
            "gradient must not be empty",
        ));
    }
    check_finite("scale", scale as f64)?;
    let n = product("out_dim", out_dim, in_dim)?;
    check_len("grad", n, grad.len())?;
    check_len("out", n, out.len())?;
    for (side, arg, dim) in [(g_inv, "g_inv", out_dim), (a_inv, "a_inv", in_dim)] {
        if let Some((layout, blocks)) = side {
            if layout.dim() != dim {
                return Err(Error::shape(
                    arg,
                    format!("dim {dim}"),
                    format!("dim {}", layout.dim()),
                ));
            }
            check_len(arg, layout.buffer_len(), blocks.len())?;
        }
    }
    if let Some(at) = find_non_finite(grad, out_dim, in_dim, in_dim) {
        return Err(non_finite_error("grad", at));
    }
    let rb = g_inv.map(|(l, _)| l.block()).unwrap_or(128);
    let n_panels = out_dim.div_ceil(rb);
    let per_slot = rb * in_dim * 4;
    let (none, none2) = (PerItem(&mut [0u8][..0], 0), PerItem(&mut [0u8][..0], 0));
    for_each_group(
        (PerItem(out, rb * in_dim), none, none2),
        n_panels,
        ws,
        per_slot,
        |range, o, _, _, stack| {
            let (mut t, _) = stack.make_with::<f32>(rb * in_dim, |_| 0.0);
            for (k, i) in range.enumerate() {
                let r0 = i * rb;
                let wi = rb.min(out_dim - r0);
                let gi = MatRef::from_row_major_slice(
                    &grad[r0 * in_dim..(r0 + wi) * in_dim],
                    wi,
                    in_dim,
                );
                let mut tm = MatMut::from_row_major_slice_mut(&mut t[..wi * in_dim], wi, in_dim);
                match g_inv {
                    Some((_, blocks)) => {
                        let gb = MatRef::from_row_major_slice(
                            &blocks[i * rb * rb..(i + 1) * rb * rb],
                            rb,
                            rb,
                        )
                        .submatrix(0, 0, wi, wi);
                        matmul(tm.rb_mut(), Accum::Replace, gb, gi, scale, Par::Seq);
                    }
                    None => {
                        for r in 0..wi {
                            for c in 0..in_dim {
                                tm[(r, c)] = scale * gi[(r, c)];
                            }
                        }
                    }
                }
                let dst = &mut o[k * rb * in_dim..k * rb * in_dim + wi * in_dim];
                match a_inv {
                    Some((layout, blocks)) => {
                        let ba = layout.block();
                        let mut om = MatMut::from_row_major_slice_mut(dst, wi, in_dim);
                        for jb in 0..layout.blocks() {
                            let c0 = jb * ba;
                            let wj = layout.valid(jb);
                            let ab = MatRef::from_row_major_slice(
                                &blocks[jb * ba * ba..(jb + 1) * ba * ba],
                                ba,
                                ba,
                            )
                            .submatrix(0, 0, wj, wj);
                            matmul(
                                om.rb_mut().submatrix_mut(0, c0, wi, wj),
                                Accum::Replace,
                                tm.rb().submatrix(0, c0, wi, wj),
                                ab,
                                1.0,
                                Par::Seq,
                            );
                        }
                    }
                    None => dst.copy_from_slice(&t[..wi * in_dim]),
                }
            }
        },
    )
}

impl FactorSet {
    /// Expands one damping value per factor into one per block, for [`Damping::PerBlock`].
    pub fn damping_per_block(&self, per_factor: &[f32]) -> Result<Vec<f32>> {
        check_len("per_factor", self.len(), per_factor.len())?;
        Ok(self
            .entries()
            .iter()
            .zip(per_factor)
            .flat_map(|(e, &l)| std::iter::repeat_n(l, e.layout.blocks()))
            .collect())
    }
}
