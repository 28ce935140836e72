//! Block-diagonal layouts: one truth about sizes, offsets and padding for every backend.
//!
//! A factor of dimension `d` split at block size `b` is stored as `nb = ceil(d / b)` diagonal
//! blocks of `b x b` f32, row-major, back to back. Rows and columns of the last block past `d`
//! are padding: zero except a 1 on the diagonal, so every block is SPD whenever the factor is.

use crate::error::{Error, Result};

/// The block sizes the kernels are built for.
pub const SUPPORTED_BLOCK_SIZES: [usize; 4] = [32, 64, 128, 256];

/// Elements a row-major `rows x d` view with row stride `ld` spans, `(rows - 1) * ld + d`
/// (0 for no rows), with `ld >= d` and `rows * ld` elements countable in 8-byte units (so
/// that no offset or byte stride derived from them overflows, here, in faer, or in a
/// kernel's 64-bit indexing); errors name `arg`.
pub(crate) fn strided_len(arg: &'static str, rows: usize, ld: usize, d: usize) -> Result<usize> {
    if ld < d {
        return Err(Error::shape(arg, format!(">= {d}"), ld));
    }
    if rows == 0 {
        return Ok(0);
    }
    rows.checked_mul(ld)
        .filter(|&n| n <= isize::MAX as usize / 8)
        .map(|_| (rows - 1) * ld + d)
        .ok_or_else(|| Error::invalid(arg, format!("{rows} rows of stride {ld} overflow")))
}

/// Checks that `block` is one of [`SUPPORTED_BLOCK_SIZES`].
pub fn check_block_size(block: usize) -> Result<()> {
    if SUPPORTED_BLOCK_SIZES.contains(&block) {
        Ok(())
    } else {
        Err(Error::invalid(
            "block",
            format!("block size must be one of {SUPPORTED_BLOCK_SIZES:?}, got {block}"),
        ))
    }
}

/// The block-diagonal layout of one factor: its dimension and block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    dim: usize,
    block: usize,
    blocks: usize,
}

impl BlockLayout {
    /// The layout of a `dim x dim` factor split into `block x block` diagonal blocks.
    ///
    /// Errors when `dim` is 0, `block` is not supported, or the buffer size overflows.
    pub fn new(dim: usize, block: usize) -> Result<Self> {
        check_block_size(block)?;
        if dim == 0 {
            return Err(Error::invalid("dim", "factor dimension must be at least 1"));
        }
        let blocks = dim.div_ceil(block);
        blocks
            .checked_mul(block * block)
            .filter(|&n| n <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(
                    "dim",
                    format!("{dim} at block {block} needs more than 2^31 - 1 elements"),
                )
            })?;
        Ok(Self { dim, block, blocks })
    }

    /// The factor's dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The block size `b`.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The number of diagonal blocks, `ceil(d / b)`.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The number of padded rows (and columns) in the last block, `nb * b - d`.
    pub fn padding(&self) -> usize {
        self.blocks * self.block - self.dim
    }

    /// Elements in one block, `b * b`.
    pub fn block_len(&self) -> usize {
        self.block * self.block
    }

    /// Elements in the whole `[nb, b, b]` buffer.
    pub fn buffer_len(&self) -> usize {
        self.blocks * self.block_len()
    }

    /// Elements a dense row-major `d x d` matrix with row stride `ld` spans,
    /// `(d - 1) * ld + d`; errors when `ld < d` or the size overflows.
    pub fn dense_len(&self, ld: usize) -> Result<usize> {
        strided_len("ld", self.dim, ld, self.dim)
    }

    /// Real (unpadded) rows of block `j`: `b`, or less for the last block.
    pub fn valid(&self, j: usize) -> usize {
        debug_assert!(j < self.blocks);
        (self.dim - j * self.block).min(self.block)
    }
}

/// One layer's entry in a [`FactorSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactorEntry {
    /// The factor's layout.
    pub layout: BlockLayout,
    /// Index of the factor's first block in the set's buffer.
    pub first_block: usize,
}

impl FactorEntry {
    /// Offset of the factor's first element in the set's buffer.
    pub fn offset(&self) -> usize {
        self.first_block * self.layout.block_len()
    }
}

/// Several factors (of several layers) with one block size, back to back in one
/// contiguous `[total_blocks, b, b]` buffer, so that every block batches together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorSet {
    block: usize,
    entries: Vec<FactorEntry>,
    total_blocks: usize,
}

impl FactorSet {
    /// A set of factors of dimensions `dims`, all split at `block`.
    ///
    /// Errors when `dims` is empty, any dimension is 0, `block` is not supported, or the
    /// buffer would exceed 2^31 - 1 elements (the kernels index with 32-bit integers).
    pub fn new(block: usize, dims: &[usize]) -> Result<Self> {
        check_block_size(block)?;
        if dims.is_empty() {
            return Err(Error::invalid(
                "dims",
                "a factor set needs at least one factor",
            ));
        }
        let mut entries = Vec::with_capacity(dims.len());
        let mut total_blocks = 0usize;
        for (i, &dim) in dims.iter().enumerate() {
            let layout = BlockLayout::new(dim, block).map_err(|e| match e {
                Error::InvalidArgument { reason, .. } => {
                    Error::invalid("dims", format!("factor {i}: {reason}"))
                }
                other => other,
            })?;
            entries.push(FactorEntry {
                layout,
                first_block: total_blocks,
            });
            total_blocks += layout.blocks();
        }
        if total_blocks
            .checked_mul(block * block)
            .is_none_or(|n| n > i32::MAX as usize)
        {
            return Err(Error::invalid(
                "dims",
                format!("{total_blocks} blocks of {block} x {block} exceed 2^31 - 1 elements"),
            ));
        }
        Ok(Self {
            block,
            entries,
            total_blocks,
        })
    }

    /// The block size `b` shared by every factor.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The per-factor table the set-wide kernels read: 3 i32 per factor (first block,
    /// block count, dimension).
    pub fn trace_table(&self) -> Vec<i32> {
        self.entries
            .iter()
            .flat_map(|e| {
                [
                    e.first_block as i32,
                    e.layout.blocks() as i32,
                    e.layout.dim() as i32,
                ]
            })
            .collect()
    }

    /// Number of factors in the set.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a set holds at least one factor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The factors' entries, in order.
    pub fn entries(&self) -> &[FactorEntry] {
        &self.entries
    }

    /// Entry `i`; errors when `i` is out of range.
    pub fn entry(&self, i: usize) -> Result<&FactorEntry> {
        self.entries.get(i).ok_or_else(|| {
            Error::invalid(
                "factor",
                format!("index {i} out of range for a set of {}", self.entries.len()),
            )
        })
    }

    /// Blocks in the whole set.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Elements in one block, `b * b`.
    pub fn block_len(&self) -> usize {
        self.block * self.block
    }

    /// Elements in the whole `[total_blocks, b, b]` buffer.
    pub fn buffer_len(&self) -> usize {
        self.total_blocks * self.block_len()
    }

    /// For every block of the set, the index of its factor.
    pub fn block_factor(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.total_blocks);
        for (i, e) in self.entries.iter().enumerate() {
            out.extend(std::iter::repeat_n(i, e.layout.blocks()));
        }
        out
    }

    /// For every block of the set, its real (unpadded) width.
    pub fn block_valid(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.total_blocks);
        for e in &self.entries {
            out.extend((0..e.layout.blocks()).map(|j| e.layout.valid(j)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_and_padding() {
        let l = BlockLayout::new(300, 128).unwrap();
        assert_eq!(
            (l.blocks(), l.padding(), l.valid(0), l.valid(2)),
            (3, 84, 128, 44)
        );
        assert_eq!(l.buffer_len(), 3 * 128 * 128);
        let l = BlockLayout::new(1, 32).unwrap();
        assert_eq!((l.blocks(), l.padding(), l.valid(0)), (1, 31, 1));
    }

    #[test]
    fn layout_rejects_impossible_shapes() {
        assert!(matches!(
            BlockLayout::new(0, 128),
            Err(Error::InvalidArgument { arg: "dim", .. })
        ));
        assert!(matches!(
            BlockLayout::new(10, 100),
            Err(Error::InvalidArgument { arg: "block", .. })
        ));
        assert!(BlockLayout::new(usize::MAX / 2, 256).is_err());
        assert!(FactorSet::new(128, &[]).is_err());
        assert!(FactorSet::new(128, &[5, 0]).is_err());
        assert!(FactorSet::new(48, &[5]).is_err());
        assert!(FactorSet::new(256, &[1 << 20; 200]).is_err());
    }

    #[test]
    fn set_offsets() {
        let s = FactorSet::new(64, &[64, 65, 1]).unwrap();
        assert_eq!(s.total_blocks(), 4);
        let firsts: Vec<_> = s.entries().iter().map(|e| e.first_block).collect();
        assert_eq!(firsts, vec![0, 1, 3]);
        assert_eq!(s.entries()[2].offset(), 3 * 64 * 64);
        assert_eq!(s.block_factor(), vec![0, 1, 1, 2]);
        assert_eq!(s.block_valid(), vec![64, 64, 1, 1]);
    }
}
