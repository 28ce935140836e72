//! The optimizer on one rank of a data-parallel group: the library does the math, the
//! caller's three callbacks move the bytes (MPI, NCCL, torch.distributed, ...).

#[allow(unused_imports)]
use super::*;

use thor_kernels::dist::{check_counts, ring_bytes, Collective, CommCounters, Communicator};

/// Sums `send` over the ranks and gives this rank its segment: `send` is `world` segments
/// back to back, segment `r` of `counts[r]` floats (`counts` has `world` entries); `recv`
/// receives the sum of every rank's segment `rank` (`counts[rank]` floats). Returns 0 on
/// success, anything else on failure. A pointer to zero floats is not null but must not be
/// read or written (a rank that owns no blocks).
pub type ThorReduceScatterFn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        send: *const f32,
        counts: *const i64,
        recv: *mut f32,
    ) -> i32,
>;

/// Gathers every rank's `send` (`counts[rank]` floats) into `recv` (the sum of `counts`
/// floats, rank 0's first). Returns 0 on success, anything else on failure. As for
/// `ThorReduceScatterFn`, a pointer to zero floats must not be dereferenced.
pub type ThorAllGatherFn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        send: *const f32,
        counts: *const i64,
        recv: *mut f32,
    ) -> i32,
>;

/// Sums the `n` doubles of `buf` over the ranks, in place; every rank must get the same
/// values. Returns 0 on success, anything else on failure.
pub type ThorAllReduceFn =
    Option<unsafe extern "C" fn(user: *mut c_void, buf: *mut f64, n: i64) -> i32>;

/// The non-null form of a callback type.
type Callback<T> = <T as IntoIterator>::Item;

/// A [`Communicator`] over the caller's callbacks.
struct CallbackComm {
    rank: usize,
    world: usize,
    user: *mut c_void,
    reduce_scatter: Callback<ThorReduceScatterFn>,
    all_gather: Callback<ThorAllGatherFn>,
    all_reduce: Callback<ThorAllReduceFn>,
    counts: Vec<i64>,
    /// The all-reduce's even segments (for the byte counters), allocated once.
    segments_buf: Vec<usize>,
    counters: CommCounters,
}

impl std::fmt::Debug for CallbackComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

// SAFETY: the optimizer holding this communicator is used by one thread at a time (the
// handle's contract), and `thor_v1_optimizer_create_distributed` requires the callbacks and
// `user` to be usable from whichever thread calls the optimizer.
unsafe impl Send for CallbackComm {}

impl CallbackComm {
    /// A reduce-scatter or all-gather through callback `f`, its arguments checked first.
    fn segments(
        &mut self,
        op: Collective,
        f: Callback<ThorReduceScatterFn>,
        send: &[f32],
        counts: &[usize],
        recv: &mut [f32],
    ) -> Result<()> {
        // The whole buffer is `send` of a reduce-scatter, `recv` of an all-gather.
        let (whole, part) = match op {
            Collective::ReduceScatter => (("send", send.len()), ("recv", recv.len())),
            _ => (("recv", recv.len()), ("send", send.len())),
        };
        check_counts(self.world, self.rank, counts, whole, part)?;
        self.counts.clear();
        self.counts.extend(counts.iter().map(|&c| c as i64));
        // SAFETY: the lengths were checked against `counts`; the callback's contract is the
        // header's.
        let code = unsafe {
            f(
                self.user,
                send.as_ptr(),
                self.counts.as_ptr(),
                recv.as_mut_ptr(),
            )
        };
        let name = match op {
            Collective::ReduceScatter => "reduce_scatter",
            _ => "all_gather",
        };
        self.status(name, code, ring_bytes(op, counts, self.rank, 4))
    }

    fn status(&mut self, what: &str, code: i32, bytes: (u64, u64)) -> Result<()> {
        if code != 0 {
            return Err(Error::Communication(format!(
                "rank {}: the {what} callback returned {code}",
                self.rank
            )));
        }
        self.counters.collectives += 1;
        self.counters.bytes_sent += bytes.0;
        self.counters.bytes_received += bytes.1;
        Ok(())
    }
}

impl Communicator for CallbackComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn reduce_scatter(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let f = self.reduce_scatter;
        self.segments(Collective::ReduceScatter, f, send, counts, recv)
    }

    fn all_gather(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let f = self.all_gather;
        self.segments(Collective::AllGather, f, send, counts, recv)
    }

    fn all_reduce(&mut self, buf: &mut [f64]) -> Result<()> {
        // SAFETY: `buf` holds `buf.len()` doubles.
        let code = unsafe { (self.all_reduce)(self.user, buf.as_mut_ptr(), buf.len() as i64) };
        let mut segs = std::mem::take(&mut self.segments_buf);
        thor_kernels::dist::even_counts(buf.len(), self.world, &mut segs);
        let bytes = ring_bytes(Collective::AllReduce, &segs, self.rank, 8);
        self.segments_buf = segs;
        self.status("all_reduce", code, bytes)
    }

    fn counters(&self) -> CommCounters {
        self.counters
    }
}

/// Creates in `*out` the optimizer of rank `rank` of a group of `world` ranks (CPU
/// backend): every rank makes it with the same `cfg`, registers the same layers in the same
/// order and calls `thor_v1_optimizer_observe` (or `_observe_conv`) for the same layers in
/// the same order with its own local batch; each such call runs three collectives through
/// the callbacks (`reduce_scatter`, `all_reduce`, `all_gather`, in that order; the
/// all-gather left out when the layer did not update), after which every rank holds the
/// decision, counters and inverses one optimizer would compute from the union of the
/// batches. `thor_v1_optimizer_observe_layers` runs several layers' steps with three
/// collectives for all of them. The callbacks are called on the thread that made the
/// observe call, one at a time. Preconditioning is local. Call
/// `thor_v1_optimizer_gather_statistics` on every rank before saving. Release with
/// `thor_v1_optimizer_destroy`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer or callback null or misaligned, `world` < 1,
/// `rank` outside `0..world`, a field of `cfg` out of range). Once a callback has failed,
/// every later statistics step, precondition and save of the optimizer returns
/// `COMMUNICATION` (its state may differ from the other ranks'). An argument error on one
/// rank during a statistics step makes the other ranks' callbacks wait for the transport's
/// timeout. Saving (`thor_v1_optimizer_save`) after a statistics step needs
/// `thor_v1_optimizer_gather_statistics` first, else it is `INVALID_ARGUMENT` naming
/// `gather_statistics`.
///
/// # Safety
/// `cfg` and `out` address one value each; the callbacks follow their types'
/// descriptions, may be called with `user` from any thread that uses the optimizer, and
/// stay valid (with `user`) until the optimizer is destroyed.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn thor_v1_optimizer_create_distributed(
    cfg: *const ThorOptimizerConfig,
    rank: i32,
    world: i32,
    user: *mut c_void,
    reduce_scatter: ThorReduceScatterFn,
    all_reduce: ThorAllReduceFn,
    all_gather: ThorAllGatherFn,
    out: *mut *mut ThorOptimizer,
) -> ThorStatus {
    guard(|| {
        // SAFETY: this function's contract, passed on.
        unsafe {
            create_distributed(
                None,
                cfg,
                rank,
                world,
                user,
                (reduce_scatter, all_reduce, all_gather),
                out,
            )
        }?;
        Ok(())
    })
}

/// `thor_v1_optimizer_create_distributed` on the context `ctx`: on a CPU context the same;
/// on a CUDA context every layer's statistics, inverses and rule state live on its device,
/// the work is queued on the context's stream and every array the optimizer functions take
/// is device memory (as `thor_v1_optimizer_create_on`). The callbacks still move host
/// memory: each collective waits for the stream, copies the device buffer down, calls the
/// callback and copies the result up.
///
/// Returns as `thor_v1_optimizer_create_distributed`; on a CUDA context also `DRIVER`.
///
/// # Safety
/// As `thor_v1_optimizer_create_distributed`; `ctx` must come from this library.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn thor_v1_optimizer_create_distributed_on(
    ctx: *mut ThorContext,
    cfg: *const ThorOptimizerConfig,
    rank: i32,
    world: i32,
    user: *mut c_void,
    reduce_scatter: ThorReduceScatterFn,
    all_reduce: ThorAllReduceFn,
    all_gather: ThorAllGatherFn,
    out: *mut *mut ThorOptimizer,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function; checked first.
        let c = unsafe { crate::context::ctx_mut(ctx)? };
        // SAFETY: this function's contract, passed on.
        unsafe {
            create_distributed(
                Some(&c.device),
                cfg,
                rank,
                world,
                user,
                (reduce_scatter, all_reduce, all_gather),
                out,
            )
        }?;
        Ok(())
    })
}

/// The two creators' common part: `device` is the context's backend (`None`: the CPU).
///
/// # Safety
/// As `thor_v1_optimizer_create_distributed`.
unsafe fn create_distributed(
    device: Option<&AnyBackend>,
    cfg: *const ThorOptimizerConfig,
    rank: i32,
    world: i32,
    user: *mut c_void,
    (reduce_scatter, all_reduce, all_gather): (
        ThorReduceScatterFn,
        ThorAllReduceFn,
        ThorAllGatherFn,
    ),
    out: *mut *mut ThorOptimizer,
) -> Result<()> {
    check_ptr("cfg", cfg)?;
    check_ptr("out", out as *const *mut ThorOptimizer)?;
    let world = usize::try_from(world)
        .ok()
        .filter(|&w| w >= 1)
        .ok_or_else(|| Error::invalid("world", format!("must be >= 1, got {world}")))?;
    let rank = usize::try_from(rank)
        .ok()
        .filter(|&r| r < world)
        .ok_or_else(|| Error::invalid("rank", format!("must be in 0..{world}, got {rank}")))?;
    let missing = |arg| Error::invalid(arg, "must not be null");
    let comm = CallbackComm {
        rank,
        world,
        user,
        reduce_scatter: reduce_scatter.ok_or_else(|| missing("reduce_scatter"))?,
        all_gather: all_gather.ok_or_else(|| missing("all_gather"))?,
        all_reduce: all_reduce.ok_or_else(|| missing("all_reduce"))?,
        counts: Vec::with_capacity(world),
        segments_buf: vec![0; world],
        counters: CommCounters::default(),
    };
    // SAFETY: checked.
    let mut config = config_of(unsafe { *cfg })?;
    let (thor, on_device) = match device {
        Some(AnyBackend::Cuda(dev)) => {
            let dev = CudaDevice::from_stream(dev.stream().clone())?;
            let staged = thor_kernels::cuda::dist::HostStagedComm::new(Box::new(comm));
            let thor = Thor::with_device_communicator(config, dev, Box::new(staged));
            (thor, true)
        }
        _ => {
            config.backend = thor_kernels::BackendKind::Cpu;
            (Thor::with_communicator(config, Box::new(comm)), false)
        }
    };
    let thor = thor.map_err(rename("thresholds", "w1"))?;
    // SAFETY: checked.
    unsafe {
        *out = Box::into_raw(Box::new(ThorOptimizer {
            thor,
            device: on_device,
        }))
    };
    Ok(())
}

/// On a distributed optimizer, gives every rank the statistics of every layer (a
/// collective: every rank calls it; one `all_gather` per layer), so that any rank's
/// `thor_v1_optimizer_save` writes the whole state, which loads into a group of any size or
/// a single optimizer. Nothing to do on other optimizers.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` null or misaligned); `COMMUNICATION`.
///
/// # Safety
/// `opt` is null or a live optimizer made by this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_gather_statistics(
    opt: *mut ThorOptimizer,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function; checked for null and alignment first.
        unsafe { opt_mut(opt)? }.gather_statistics()?;
        Ok(())
    })
}
