//! Scratch memory for the CPU backend, allocated once by the caller and reused every step.

use std::mem::MaybeUninit;
use std::ops::Range;

use faer::dyn_stack::MemStack;

use crate::error::{Error, Result};

/// Scratch memory for CPU operations that need it.
///
/// Size it with the operation's `*_workspace_size` query, once, outside the training loop;
/// operations never allocate. A workspace may be shared by every operation whose size
/// query it satisfies.
#[derive(Debug, Default)]
pub struct Workspace {
    buf: Vec<MaybeUninit<u8>>,
}

impl Workspace {
    /// A workspace of `bytes` bytes. Aborts the process when the memory is not there, like
    /// any Rust allocation: for sizes a caller chooses, use [`Workspace::try_new`].
    pub fn new(bytes: usize) -> Self {
        let mut buf = Vec::new();
        buf.resize(bytes, MaybeUninit::uninit());
        Self { buf }
    }

    /// A workspace of `bytes` bytes, or [`Error::OutOfMemory`] (argument `workspace`) when
    /// the allocation fails.
    pub fn try_new(bytes: usize) -> Result<Self> {
        Ok(Self {
            buf: crate::error::try_vec("workspace", bytes, MaybeUninit::uninit())?,
        })
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether it holds no memory at all.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Alignment of each per-thread slot inside a workspace.
const SLOT_ALIGN: usize = 64;

/// Parallel slots a workspace is sized for: one per rayon worker.
pub(crate) fn slot_count() -> usize {
    rayon::current_num_threads().max(1)
}

/// Bytes of one slot that holds `bytes` of scratch plus alignment slack.
pub(crate) fn slot_bytes(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        bytes
            .saturating_add(SLOT_ALIGN)
            .checked_next_multiple_of(SLOT_ALIGN)
            .unwrap_or(usize::MAX)
    }
}

/// The workspace size for an operation whose every parallel slot needs `per_slot` bytes.
pub(crate) fn workspace_size(per_slot: usize, items: usize) -> usize {
    slot_bytes(per_slot).saturating_mul(slot_count().min(items.max(1)))
}

/// Per-item outputs handed to [`for_each_group`]: a slice and how many of its elements
/// belong to each item (0 when unused; the last item may own fewer).
pub(crate) struct PerItem<'a, T>(pub &'a mut [T], pub usize);

/// Runs `f` over `n_items` work items split into contiguous groups, in parallel, each group
/// with its own slot of the workspace. The three per-item outputs are split along with the
/// items, so each group writes only its own items.
pub(crate) fn for_each_group<T: Send, U: Send, V: Send>(
    (out, aux, aux2): (PerItem<'_, T>, PerItem<'_, U>, PerItem<'_, V>),
    n_items: usize,
    ws: &mut Workspace,
    per_slot: usize,
    f: impl Fn(Range<usize>, &mut [T], &mut [U], &mut [V], &mut MemStack) + Sync,
) -> Result<()> {
    if n_items == 0 {
        return Ok(());
    }
    let sb = slot_bytes(per_slot);
    let slots = ws.len().checked_div(sb).unwrap_or_else(slot_count);
    if slots == 0 {
        return Err(Error::shape(
            "workspace",
            format!("at least {sb} bytes (use the operation's workspace_size query)"),
            format!("{} bytes", ws.len()),
        ));
    }
    let per_group = n_items.div_ceil(slots.min(n_items));
    let groups = n_items.div_ceil(per_group);
    let g = Groups {
        per_group,
        n_items,
        widths: (out.1, aux.1, aux2.1),
        slot: sb,
    };
    g.run(0..groups, (out.0, aux.0, aux2.0), &mut ws.buf[..], &f);
    Ok(())
}

/// How [`for_each_group`] cuts its work: items per group, the item count, the per-item
/// widths of the three outputs, and the bytes of one workspace slot.
struct Groups {
    per_group: usize,
    n_items: usize,
    widths: (usize, usize, usize),
    slot: usize,
}

impl Groups {
    /// Runs groups `range` on their shares of the outputs and workspace, halving the range
    /// with `rayon::join` (no allocation, unlike collecting the shares first).
    fn run<T: Send, U: Send, V: Send>(
        &self,
        range: Range<usize>,
        (o, a, a2): (&mut [T], &mut [U], &mut [V]),
        w: &mut [MaybeUninit<u8>],
        f: &(impl Fn(Range<usize>, &mut [T], &mut [U], &mut [V], &mut MemStack) + Sync),
    ) {
        if range.len() == 1 {
            let start = range.start * self.per_group;
            let items = start..(start + self.per_group).min(self.n_items);
            f(items, o, a, a2, MemStack::new(w));
            return;
        }
        let mid = range.start + range.len() / 2;
        let items = (mid - range.start) * self.per_group;
        let (oh, ot) = o.split_at_mut((items * self.widths.0).min(o.len()));
        let (ah, at) = a.split_at_mut((items * self.widths.1).min(a.len()));
        let (bh, bt) = a2.split_at_mut((items * self.widths.2).min(a2.len()));
        let (wh, wt) = w.split_at_mut(((mid - range.start) * self.slot).min(w.len()));
        rayon::join(
            || self.run(range.start..mid, (oh, ah, bh), wh, f),
            || self.run(mid..range.end, (ot, at, bt), wt, f),
        );
    }
}
