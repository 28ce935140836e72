//! Argument checks every entry point runs before it touches memory: null, alignment, sizes,
//! overlaps.

#[allow(unused_imports)]
use super::*;

pub(crate) fn dim(arg: &'static str, v: i64) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| Error::invalid(arg, format!("must be >= 1, got {v}")))
}

pub(crate) fn count(arg: &'static str, parts: &[usize]) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= (isize::MAX as usize) / 8)
        .ok_or_else(|| Error::invalid(arg, "size overflows"))
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

/// Errors when `[a, a + a_len)` and `[b, b + b_len)` (in elements of T) overlap.
pub(crate) fn check_disjoint<T, U>(
    a_arg: &'static str,
    a: *const T,
    a_len: usize,
    b_arg: &'static str,
    b: *const U,
    b_len: usize,
) -> Result<()> {
    let (a0, a1) = (a as usize, a as usize + a_len * std::mem::size_of::<T>());
    let (b0, b1) = (b as usize, b as usize + b_len * std::mem::size_of::<U>());
    if a0 < b1 && b0 < a1 {
        return Err(Error::invalid(b_arg, format!("overlaps `{a_arg}`")));
    }
    Ok(())
}

/// # Safety
/// The caller's pointer contract: a non-null pointer addresses what its name says, for the
/// lengths given, valid for the call.
pub(crate) unsafe fn host<'a, T>(arg: &'static str, p: *const T, len: usize) -> Result<&'a [T]> {
    check_ptr(arg, p)?;
    // SAFETY: non-null and aligned; the caller promises `len` valid elements.
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
    // SAFETY: non-null and aligned; the caller promises `len` valid, exclusive elements.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}
