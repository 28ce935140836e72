//! THOR's factor step across ranks (data-parallel training): every block of every factor is
//! owned by one rank.
//!
//! Each rank accumulates the factors of its local batch; a reduce-scatter delivers each
//! block's sum to its owner only, as a packed lower triangle (blocks of frozen factors,
//! the same on every rank, are left out); one small all-reduce carries
//! what every rank needs to decide (per factor: whether any rank's input was not finite,
//! the samples of the union; per block, from its owner: the traces of the old statistics
//! and of the new sum), so that every rank computes the same traces and takes the same rule
//! decision for every layer; owners apply the EMA to their blocks and invert those of the
//! updated layers; the refreshed inverses are all-gathered (only those). Every rank then
//! holds every inverse and applies the preconditioner to its own gradients locally. At most
//! three collectives per statistics step of a whole-model step ([`CpuThorStep`] over every
//! layer), whatever the number of layers (the all-gather is skipped when no layer updated);
//! [`crate::thor::Thor::with_communicator`] runs one step per layer: three collectives per
//! layer through [`crate::thor::Thor::observe`], three for all the layers observed together
//! through [`crate::thor::Thor::observe_layers`] (their collectives joined).
//!
//! [`CpuThorStep`]: crate::cpu::step::CpuThorStep
//!
//! - [`OwnershipPlan`]: which rank owns which block, balanced by inversion cost,
//!   deterministic from the factor set and the world size alone, with the bytes each rank
//!   sends per statistics step.
//! - [`Communicator`]: the collectives the step needs (reduce-scatter and all-gather with
//!   per-rank counts, a small f64 all-reduce), behind a small interface so that any transport
//!   can move the bytes; [`LocalGroup`] runs ranks as threads of one process (tests, and
//!   the reference for other transports).
//! - The step itself is [`crate::cpu::step::CpuThorStep::new_distributed`]: the same step
//!   as on one rank, with the collectives between its stages; on a GPU,
//!   `CudaDevice::new_distributed_thor_step` (`crate::cuda::dist`: NCCL, or any
//!   [`Communicator`] staged through host memory).
//!
//! A collective that fails (a rank left the group or did not arrive within the timeout)
//! returns [`crate::Error::Communication`] on every other rank; the group, and the state of
//! every step that used it, is broken afterwards (a later step refuses to run): restore a
//! saved state into a new step on a new group.

mod batch;
mod comm;
mod plan;

pub(crate) use batch::{Batch, BatchSlot, Participant};
#[cfg(feature = "cuda")]
pub(crate) use comm::SharedCell;
pub use comm::{check_counts, CommCounters, Communicator, LocalComm, LocalGroup, SharedComm};
pub use plan::{
    even_counts, pack_lower, ring_bytes, tri_len, unpack_lower, Collective, OwnershipPlan,
};
