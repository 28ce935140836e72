//! Argument checks every entry point runs before it touches memory or state: integers,
//! sizes (one checked arithmetic), null and alignment, overlaps.

#[allow(unused_imports)]
use super::*;

/// The most factors one call or plan takes (`n_factors`): a set of more factors than this
/// exceeds the 2^31 - 1 elements of the block buffer at every block size anyway.
pub const THOR_MAX_FACTORS: i64 = 1 << 21;

/// The most bytes one buffer may span: every element count and stride product must stay
/// under it (so that no offset overflows, on the host or in a kernel's 64-bit indexing).
pub(crate) const MAX_BYTES: usize = isize::MAX as usize;

/// A dimension or count `>= 1`.
pub(crate) fn dim(arg: &'static str, v: i64) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| Error::invalid(arg, format!("must be >= 1, got {v}")))
}

/// A factor count in `1..=THOR_MAX_FACTORS`.
pub(crate) fn factors(arg: &'static str, v: i64) -> Result<usize> {
    if !(1..=THOR_MAX_FACTORS).contains(&v) {
        return Err(Error::invalid(
            arg,
            format!("must be in 1..={THOR_MAX_FACTORS}, got {v}"),
        ));
    }
    Ok(v as usize)
}

/// The product of `parts` (an element count), refused when it overflows or when that many
/// 8-byte elements would pass [`MAX_BYTES`].
pub(crate) fn count(arg: &'static str, parts: &[usize]) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= MAX_BYTES / 8)
        .ok_or_else(|| Error::invalid(arg, format!("{parts:?} elements overflow")))
}

/// Elements a strided input of `rows` rows of `dim` with row stride `ld` spans,
/// `(rows - 1) * ld + dim`, checked (`ld >= dim`, `rows * ld` countable), named `arg`.
pub(crate) fn span(arg: &'static str, rows: usize, ld: usize, dim: usize) -> Result<usize> {
    if ld < dim {
        return Err(Error::shape(arg, format!(">= {dim}"), ld));
    }
    // `rows * ld` itself countable, not only the span: a byte stride derived from `ld` must
    // not overflow either (one row of stride 2^61 spans `dim` elements).
    rows.checked_mul(ld)
        .filter(|&n| n <= MAX_BYTES / 8 && rows >= 1)
        .map(|_| (rows - 1) * ld + dim)
        .ok_or_else(|| {
            Error::invalid(
                arg,
                format!("{rows} rows of stride {ld} overflow the address space"),
            )
        })
}

/// Maps an error of the library that names `from` to one that names the C argument `to`.
pub(crate) fn rename(from: &'static str, to: &'static str) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::InvalidArgument { arg, reason } if arg == from => {
            Error::InvalidArgument { arg: to, reason }
        }
        Error::Shape {
            arg,
            expected,
            actual,
        } if arg == from => Error::Shape {
            arg: to,
            expected,
            actual,
        },
        Error::OutOfMemory { arg, bytes } if arg == from => Error::OutOfMemory { arg: to, bytes },
        other => other,
    }
}

/// A block size argument: 32, 64, 128 or 256.
pub(crate) fn block(v: i32) -> Result<usize> {
    let b = usize::try_from(v).unwrap_or(0);
    thor_kernels::layout::check_block_size(b)
        .map_err(|_| Error::invalid("block", format!("must be 32, 64, 128 or 256, got {v}")))?;
    Ok(b)
}

/// A scalar that must be finite, named `arg`.
pub(crate) fn finite(arg: &'static str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(arg, format!("must be finite, got {v}")))
    }
}

pub(crate) fn check_ptr<T>(arg: &'static str, p: *const T) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid(arg, "null pointer"));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::invalid(
            arg,
            format!(
                "pointer {p:p} is not {}-byte aligned",
                std::mem::align_of::<T>()
            ),
        ));
    }
    Ok(())
}

/// One pointer argument of a call: its name, address, byte length, alignment, whether the
/// call writes it, and whether it may be null (then it is skipped).
#[derive(Debug, Clone, Copy)]
struct Region {
    arg: &'static str,
    addr: usize,
    bytes: usize,
    align: usize,
    write: bool,
    optional: bool,
}

/// The pointer arguments of one call, checked together by [`Regions::check`]: every
/// required pointer non-null, every pointer aligned and its span inside the address space,
/// then no written region overlapping any other region (reads may share memory). Pairs
/// the header allows to be the same buffer are registered once.
#[derive(Debug, Default)]
pub(crate) struct Regions(Vec<Region>);

impl Regions {
    pub(crate) fn new() -> Self {
        Regions(Vec::with_capacity(8))
    }

    fn add<T>(&mut self, arg: &'static str, p: *const T, len: usize, w: bool, o: bool) {
        self.0.push(Region {
            arg,
            addr: p as usize,
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
            align: std::mem::align_of::<T>(),
            write: w,
            optional: o,
        });
    }

    /// A buffer of `len` elements the call reads.
    pub(crate) fn read<T>(mut self, arg: &'static str, p: *const T, len: usize) -> Self {
        self.add(arg, p, len, false, false);
        self
    }

    /// A buffer of `len` elements the call reads, or null.
    pub(crate) fn read_opt<T>(mut self, arg: &'static str, p: *const T, len: usize) -> Self {
        self.add(arg, p, len, false, true);
        self
    }

    /// A buffer of `bytes` bytes with alignment `align` the call reads (an input whose
    /// element type is a run-time argument).
    pub(crate) fn read_bytes(
        mut self,
        arg: &'static str,
        p: *const c_void,
        bytes: usize,
        align: usize,
    ) -> Self {
        self.0.push(Region {
            arg,
            addr: p as usize,
            bytes,
            align,
            write: false,
            optional: false,
        });
        self
    }

    /// A buffer of `len` elements the call writes.
    pub(crate) fn write<T>(mut self, arg: &'static str, p: *const T, len: usize) -> Self {
        self.add(arg, p, len, true, false);
        self
    }

    /// A buffer of `len` elements the call writes, or null.
    pub(crate) fn write_opt<T>(mut self, arg: &'static str, p: *const T, len: usize) -> Self {
        self.add(arg, p, len, true, true);
        self
    }

    /// Runs the checks, in argument order: null first for all, then alignment and span,
    /// then overlaps.
    pub(crate) fn check(self) -> Result<()> {
        for r in &self.0 {
            if r.addr == 0 && !r.optional {
                return Err(Error::invalid(r.arg, "null pointer"));
            }
        }
        let live: Vec<&Region> = self.0.iter().filter(|r| r.addr != 0).collect();
        for r in &live {
            if r.addr % r.align != 0 {
                return Err(Error::invalid(
                    r.arg,
                    format!("pointer {:#x} is not {}-byte aligned", r.addr, r.align),
                ));
            }
            if r.bytes > MAX_BYTES || r.addr.checked_add(r.bytes).is_none() {
                return Err(Error::invalid(
                    r.arg,
                    format!("{} bytes at {:#x} pass the address space", r.bytes, r.addr),
                ));
            }
        }
        // Only pairs with a written region can conflict: each writer against every other
        // region, each pair once (a call has few outputs and may have many inputs).
        for (i, w) in live.iter().enumerate().filter(|(_, r)| r.write) {
            for (j, r) in live.iter().enumerate() {
                if j == i || (r.write && j < i) {
                    continue;
                }
                let overlap = w.addr < r.addr + r.bytes && r.addr < w.addr + w.bytes;
                if overlap && w.bytes > 0 && r.bytes > 0 {
                    let (first, second) = if i < j { (w, r) } else { (r, w) };
                    return Err(Error::invalid(
                        second.arg,
                        format!("overlaps `{}`", first.arg),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// # Safety
/// The caller's pointer contract: a non-null pointer addresses what its name says, for the
/// lengths given, valid for the call.
pub(crate) unsafe fn host<'a, T>(arg: &'static str, p: *const T, len: usize) -> Result<&'a [T]> {
    check_ptr(arg, p)?;
    check_span::<T>(arg, p as usize, len)?;
    // SAFETY: non-null, aligned, a span inside the address space; the caller promises `len`
    // valid elements.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// # Safety
/// The caller's pointer contract: a non-null pointer addresses what its name says, for the
/// lengths given, valid for the call.
pub(crate) unsafe fn host_mut<'a, T>(
    arg: &'static str,
    p: *mut T,
    len: usize,
) -> Result<&'a mut [T]> {
    check_ptr(arg, p as *const T)?;
    check_span::<T>(arg, p as usize, len)?;
    // SAFETY: non-null, aligned, a span inside the address space; the caller promises `len`
    // valid, exclusive elements.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// `len` elements of T from `addr` stay inside the address space (what a slice requires).
fn check_span<T>(arg: &'static str, addr: usize, len: usize) -> Result<()> {
    let bytes = len.checked_mul(std::mem::size_of::<T>());
    if bytes.is_none_or(|b| b > MAX_BYTES || addr.checked_add(b).is_none()) {
        return Err(Error::invalid(
            arg,
            format!("{len} elements at {addr:#x} pass the address space"),
        ));
    }
    Ok(())
}
