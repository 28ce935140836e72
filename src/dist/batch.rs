//! The collectives of several steps run as one: the layers of a model observed together
//! ([`crate::thor::Thor::observe_layers`]) each run their own statistics step on a thread
//! of its own, and their reduce-scatters, all-reduces and all-gathers are joined into one
//! collective of each kind on the rank's communicator, so that a statistics step of the
//! whole model costs three collectives instead of three per layer.
//!
//! Each step's communicator is a [`Participant`]: outside a batch it hands its collectives
//! to the rank's [`SharedComm`] one by one; inside one ([`BatchSlot::join`]) it deposits
//! them with the [`Batch`]. Once every participant still running has a collective pending,
//! those of the kind that comes first in a statistics step (reduce-scatter, all-reduce,
//! all-gather) run as one on the thread that drives the batch (the caller's: a transport
//! sees its collectives on the thread it was called from before), their data concatenated
//! in participant order, segment by segment. Which steps leave out which collective (a frozen layer sends nothing, a layer
//! that did not update gathers nothing) is the same on every rank, so every rank forms the
//! same joined collectives. A participant that fails, or panics, breaks the batch and the
//! group: the others' collectives fail at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::comm::{check_counts, CommCounters, Communicator, SharedComm};
use crate::error::{check_len, Error, Result};

/// One participant's pending collective, its data copied.
#[derive(Debug)]
enum Call {
    ReduceScatter { send: Vec<f32>, counts: Vec<usize> },
    AllReduce { buf: Vec<f64> },
    AllGather { send: Vec<f32>, counts: Vec<usize> },
}

impl Call {
    /// Where the collective comes in a statistics step: rounds run the earliest first.
    fn order(&self) -> u8 {
        match self {
            Call::ReduceScatter { .. } => 0,
            Call::AllReduce { .. } => 1,
            Call::AllGather { .. } => 2,
        }
    }
}

/// What a participant's collective received.
#[derive(Debug)]
enum Out {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

#[derive(Debug)]
struct State {
    base: SharedComm,
    active: Vec<bool>,
    calls: Vec<Option<Call>>,
    outs: Vec<Option<Out>>,
    failed: Option<String>,
    /// Whether the participants may start (`None`: not yet; `Some(false)`: cancelled).
    gate: Option<bool>,
    /// Why the group is to be aborted: done by the driver, on its thread.
    abort: Option<String>,
}

/// The joined collectives of `participants` steps on one rank.
#[derive(Debug)]
pub(crate) struct Batch {
    state: Mutex<State>,
    cv: Condvar,
}

fn broken(why: &str) -> Error {
    Error::Communication(format!("a joined collective of the batch failed ({why})"))
}

/// Offsets of the segments of `counts`, and their total.
fn offsets(counts: &[usize]) -> (Vec<usize>, usize) {
    let mut at = 0;
    let offs = counts
        .iter()
        .map(|&c| {
            let o = at;
            at += c;
            o
        })
        .collect();
    (offs, at)
}

impl Batch {
    /// A batch of `participants` steps whose collectives go to `base`.
    pub(crate) fn new(base: SharedComm, participants: usize) -> Arc<Self> {
        Arc::new(Batch {
            state: Mutex::new(State {
                base,
                active: vec![true; participants],
                calls: (0..participants).map(|_| None).collect(),
                outs: (0..participants).map(|_| None).collect(),
                failed: None,
                gate: None,
                abort: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Participant `p`'s collective: deposited, run with the others' by [`Batch::drive`],
    /// its output returned.
    fn call(&self, p: usize, call: Call) -> Result<Out> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(broken(why));
        }
        st.calls[p] = Some(call);
        self.cv.notify_all();
        loop {
            if let Some(out) = st.outs[p].take() {
                return Ok(out);
            }
            if let Some(why) = st.failed.clone() {
                st.calls[p] = None;
                return Err(broken(&why));
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets the participants start (`go`), or cancels the batch before any has: each then
    /// leaves without running, and the group is not told (nothing was sent).
    pub(crate) fn open(&self, go: bool) {
        let mut st = self.lock();
        st.gate = Some(go);
        if !go {
            st.failed = Some("the batch was cancelled before it started".into());
        }
        self.cv.notify_all();
    }

    /// Waits until the batch opens: whether participant `p` may run its step.
    pub(crate) fn wait_open(&self) -> bool {
        let mut st = self.lock();
        loop {
            if let Some(go) = st.gate {
                return go;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Breaks the batch: every pending and later collective fails, and the driver aborts
    /// the group (on its thread) with `why`.
    pub(crate) fn fail(&self, why: &str) {
        let mut st = self.lock();
        Self::fail_in(&mut st, why);
        self.cv.notify_all();
    }

    fn fail_in(st: &mut State, why: &str) {
        if st.failed.is_none() {
            st.failed = Some(why.to_string());
            st.abort = Some(why.to_string());
        }
    }

    /// Participant `p` is done: its step returned (`failure` says why it failed, which
    /// breaks the batch and the group) or panicked.
    pub(crate) fn leave(&self, p: usize, failure: Option<&str>) {
        let mut st = self.lock();
        st.active[p] = false;
        st.calls[p] = None;
        st.outs[p] = None;
        if let Some(why) = failure {
            Self::fail_in(&mut st, &format!("a layer's step failed: {why}"));
        }
        self.cv.notify_all();
    }

    /// Runs the joined collectives on the calling thread (the one whose transport it is:
    /// some need their collectives on one thread) until every participant has left: a
    /// round whenever every running participant has a collective pending, those of the
    /// kind that comes first. The group's abort, when a participant failed, is made here
    /// too. A collective or an abort that panics breaks the batch; the panic goes on once
    /// every participant has left.
    pub(crate) fn drive(&self) {
        let mut st = self.lock();
        let mut panic = None;
        while st.active.iter().any(|&a| a) || st.abort.is_some() {
            if let Some(why) = st.abort.take() {
                // The participants were told (`failed`) before the transport is.
                self.cv.notify_all();
                let base = &mut st.base;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| base.abort(&why)));
                if let Err(p) = r {
                    panic.get_or_insert(p);
                }
                continue;
            }
            let ready = st.failed.is_none()
                && st
                    .active
                    .iter()
                    .zip(&st.calls)
                    .all(|(&a, c)| !a || c.is_some());
            if !ready {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let first = st.calls.iter().flatten().map(Call::order).min();
            let ps: Vec<usize> = (0..st.calls.len())
                .filter(|&p| st.calls[p].as_ref().map(Call::order) == first)
                .collect();
            let calls: Vec<Call> = ps.iter().filter_map(|&p| st.calls[p].take()).collect();
            let base = &mut st.base;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Self::joined(base, calls)
            }));
            match run {
                Ok(Ok(outs)) => {
                    for (p, out) in ps.into_iter().zip(outs) {
                        st.outs[p] = Some(out);
                    }
                }
                // The transport failed: it knows (a failed collective breaks the shared
                // communicator for good).
                Ok(Err(e)) => st.failed = Some(e.to_string()),
                Err(p) => {
                    Self::fail_in(&mut st, "a panic inside a joined collective");
                    panic = Some(p);
                }
            }
            self.cv.notify_all();
        }
        drop(st);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// One collective for `calls` (all of one kind, in participant order).
    fn joined(base: &mut SharedComm, calls: Vec<Call>) -> Result<Vec<Out>> {
        let (world, rank) = (base.world(), base.rank());
        match calls[0] {
            Call::AllReduce { .. } => {
                let mut bufs: Vec<Vec<f64>> = calls
                    .into_iter()
                    .map(|c| match c {
                        Call::AllReduce { buf } => buf,
                        _ => unreachable!("a round is of one kind"),
                    })
                    .collect();
                let mut all: Vec<f64> = bufs.concat();
                base.all_reduce(&mut all)?;
                let mut at = 0;
                for b in &mut bufs {
                    let n = b.len();
                    b.copy_from_slice(&all[at..at + n]);
                    at += n;
                }
                Ok(bufs.into_iter().map(Out::F64).collect())
            }
            Call::ReduceScatter { .. } | Call::AllGather { .. } => {
                let gather = matches!(calls[0], Call::AllGather { .. });
                let parts: Vec<(Vec<f32>, Vec<usize>)> = calls
                    .into_iter()
                    .map(|c| match c {
                        Call::ReduceScatter { send, counts } | Call::AllGather { send, counts } => {
                            (send, counts)
                        }
                        Call::AllReduce { .. } => unreachable!("a round is of one kind"),
                    })
                    .collect();
                let mut counts = vec![0usize; world];
                for (_, c) in &parts {
                    for (t, &n) in counts.iter_mut().zip(c) {
                        *t += n;
                    }
                }
                let (joff, total) = offsets(&counts);
                if gather {
                    let send: Vec<f32> =
                        parts.iter().flat_map(|(s, _)| s.iter().copied()).collect();
                    let mut recv = vec![0.0f32; total];
                    base.all_gather(&send, &counts, &mut recv)?;
                    // Participant i's segment from rank r follows the earlier participants'.
                    let mut before = vec![0usize; world];
                    let mut outs = Vec::with_capacity(parts.len());
                    for (_, c) in &parts {
                        let mut mine = Vec::with_capacity(c.iter().sum());
                        for r in 0..world {
                            let at = joff[r] + before[r];
                            mine.extend_from_slice(&recv[at..at + c[r]]);
                            before[r] += c[r];
                        }
                        outs.push(Out::F32(mine));
                    }
                    Ok(outs)
                } else {
                    // Rank r's segment: every participant's segment r, in order.
                    let mut send = Vec::with_capacity(total);
                    let offs: Vec<Vec<usize>> = parts.iter().map(|(_, c)| offsets(c).0).collect();
                    for r in 0..world {
                        for ((s, c), o) in parts.iter().zip(&offs) {
                            send.extend_from_slice(&s[o[r]..o[r] + c[r]]);
                        }
                    }
                    let mut recv = vec![0.0f32; counts[rank]];
                    base.reduce_scatter(&send, &counts, &mut recv)?;
                    let mut at = 0;
                    Ok(parts
                        .iter()
                        .map(|(_, c)| {
                            let mine = recv[at..at + c[rank]].to_vec();
                            at += c[rank];
                            Out::F32(mine)
                        })
                        .collect())
                }
            }
        }
    }
}

/// A batch and a participant's index in it.
type Membership = Option<(Arc<Batch>, usize)>;

/// Which batch, if any, a [`Participant`] is in, and as which participant.
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchSlot(Arc<Mutex<Membership>>);

impl BatchSlot {
    /// Puts the slot's participant in `batch` as participant `p`, until the guard drops.
    pub(crate) fn join(&self, batch: &Arc<Batch>, p: usize) -> SlotGuard<'_> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((batch.clone(), p));
        SlotGuard(self)
    }

    fn get(&self) -> Membership {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Takes a participant out of its batch when dropped.
#[derive(Debug)]
pub(crate) struct SlotGuard<'a>(&'a BatchSlot);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// One step's end of the rank's communicator: its collectives go to the shared
/// communicator, or, while its slot is in a batch, into the batch's joined collectives.
#[derive(Debug)]
pub(crate) struct Participant {
    shared: SharedComm,
    slot: BatchSlot,
}

impl Participant {
    /// A participant on `shared`, and its slot.
    pub(crate) fn new(shared: SharedComm) -> (Self, BatchSlot) {
        let slot = BatchSlot::default();
        (
            Participant {
                shared,
                slot: slot.clone(),
            },
            slot,
        )
    }
}

impl Communicator for Participant {
    fn rank(&self) -> usize {
        self.shared.rank()
    }
    fn world(&self) -> usize {
        self.shared.world()
    }
    fn reduce_scatter(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let Some((batch, p)) = self.slot.get() else {
            return self.shared.reduce_scatter(send, counts, recv);
        };
        let (world, rank) = (self.world(), self.rank());
        check_counts(
            world,
            rank,
            counts,
            ("send", send.len()),
            ("recv", recv.len()),
        )?;
        let call = Call::ReduceScatter {
            send: send.to_vec(),
            counts: counts.to_vec(),
        };
        copy_out(batch.call(p, call)?, recv)
    }
    fn all_gather(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let Some((batch, p)) = self.slot.get() else {
            return self.shared.all_gather(send, counts, recv);
        };
        let (world, rank) = (self.world(), self.rank());
        check_counts(
            world,
            rank,
            counts,
            ("recv", recv.len()),
            ("send", send.len()),
        )?;
        let call = Call::AllGather {
            send: send.to_vec(),
            counts: counts.to_vec(),
        };
        copy_out(batch.call(p, call)?, recv)
    }
    fn all_reduce(&mut self, buf: &mut [f64]) -> Result<()> {
        let Some((batch, p)) = self.slot.get() else {
            return self.shared.all_reduce(buf);
        };
        match batch.call(p, Call::AllReduce { buf: buf.to_vec() })? {
            Out::F64(v) => {
                check_len("buf", buf.len(), v.len())?;
                buf.copy_from_slice(&v);
                Ok(())
            }
            Out::F32(_) => Err(broken("an all-reduce received f32")),
        }
    }
    fn counters(&self) -> CommCounters {
        self.shared.counters()
    }
    fn failed(&self) -> Option<String> {
        self.shared.failed()
    }
    fn abort(&mut self, why: &str) {
        match self.slot.get() {
            // The batch's driver tells the transport, on its thread.
            Some((batch, _)) => batch.fail(why),
            None => self.shared.abort(why),
        }
    }
}

fn copy_out(out: Out, recv: &mut [f32]) -> Result<()> {
    match out {
        Out::F32(v) => {
            check_len("recv", recv.len(), v.len())?;
            recv.copy_from_slice(&v);
            Ok(())
        }
        Out::F64(_) => Err(broken("a reduce-scatter or all-gather received f64")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::LocalGroup;
    use std::time::Duration;

    /// Each rank: participant 0 runs a reduce-scatter, an all-reduce and an all-gather;
    /// participant 1 leaves the reduce-scatter out and gathers nothing from rank 0. The
    /// batch joins them into three collectives, and each participant gets what it would
    /// have got alone.
    #[test]
    fn participants_with_different_collectives_get_their_own_results() {
        let out = LocalGroup::run(2, Duration::from_secs(20), |comm| {
            let r = comm.rank() as f32;
            let shared = SharedComm::new(Box::new(comm));
            let batch = Batch::new(shared.clone(), 2);
            let (mut p0, s0) = Participant::new(shared.clone());
            let (mut p1, s1) = Participant::new(shared.clone());
            let (a, b) = std::thread::scope(|sc| {
                let batch = &batch;
                let h0 = sc.spawn(move || {
                    let _j = s0.join(batch, 0);
                    assert!(batch.wait_open());
                    // Segments of 2 (to rank 0) and 1 (to rank 1).
                    let send = [r + 1.0, r + 2.0, 10.0 * r + 3.0];
                    let mut rs = vec![f32::NAN; [2, 1][r as usize]];
                    p0.reduce_scatter(&send, &[2, 1], &mut rs).unwrap();
                    let mut ar = [f64::from(r) + 1.0, 10.0];
                    p0.all_reduce(&mut ar).unwrap();
                    let mine: Vec<f32> = (0..[1, 2][r as usize])
                        .map(|i| 5.0 * r + i as f32)
                        .collect();
                    let mut ag = vec![f32::NAN; 3];
                    p0.all_gather(&mine, &[1, 2], &mut ag).unwrap();
                    batch.leave(0, None);
                    (rs, ar.to_vec(), ag)
                });
                let h1 = sc.spawn(move || {
                    let _j = s1.join(batch, 1);
                    assert!(batch.wait_open());
                    let mut ar = [100.0 * f64::from(r)];
                    p1.all_reduce(&mut ar).unwrap();
                    let mine: Vec<f32> = if r == 0.0 { vec![] } else { vec![7.0] };
                    let mut ag = vec![f32::NAN; 1];
                    p1.all_gather(&mine, &[0, 1], &mut ag).unwrap();
                    batch.leave(1, None);
                    (ar.to_vec(), ag)
                });
                batch.open(true);
                batch.drive();
                (h0.join().unwrap(), h1.join().unwrap())
            });
            (a, b, shared.counters().collectives)
        })
        .unwrap();
        for (rank, ((rs, ar0, ag0), (ar1, ag1), n)) in out.into_iter().enumerate() {
            let want_rs = if rank == 0 {
                vec![3.0, 5.0]
            } else {
                vec![16.0]
            };
            assert_eq!(rs, want_rs, "rank {rank}");
            assert_eq!(ar0, vec![3.0, 20.0]);
            assert_eq!(ag0, vec![0.0, 5.0, 6.0]);
            assert_eq!(ar1, vec![100.0]);
            assert_eq!(ag1, vec![7.0]);
            assert_eq!(n, 3, "rank {rank}: three joined collectives");
        }
    }

    #[test]
    fn a_participant_that_fails_breaks_the_batch_and_the_group_from_the_driver() {
        let mut comms = LocalGroup::new(1, Duration::from_secs(5)).unwrap();
        let shared = SharedComm::new(Box::new(comms.pop().unwrap()));
        let batch = Batch::new(shared.clone(), 2);
        let (mut p0, s0) = Participant::new(shared.clone());
        let driver = std::thread::current().id();
        let e = std::thread::scope(|sc| {
            let batch = &batch;
            let h0 = sc.spawn(move || {
                let _j = s0.join(batch, 0);
                assert!(batch.wait_open());
                let mut ar = [1.0f64];
                let e = p0.all_reduce(&mut ar).unwrap_err();
                batch.leave(0, Some(&e.to_string()));
                e
            });
            sc.spawn(move || {
                assert!(batch.wait_open());
                assert_ne!(std::thread::current().id(), driver);
                batch.leave(1, Some("out of memory"));
            });
            batch.open(true);
            batch.drive();
            h0.join().unwrap()
        });
        assert!(
            matches!(&e, Error::Communication(m) if m.contains("out of memory")),
            "{e}"
        );
        // The driver told the group.
        assert!(shared.failed().is_some_and(|w| w.contains("out of memory")));
        // A cancelled batch runs nothing and leaves the group whole.
        let mut comms = LocalGroup::new(1, Duration::from_secs(5)).unwrap();
        let shared = SharedComm::new(Box::new(comms.pop().unwrap()));
        let batch = Batch::new(shared.clone(), 1);
        std::thread::scope(|sc| {
            let batch = &batch;
            sc.spawn(move || {
                assert!(!batch.wait_open());
                batch.leave(0, None);
            });
            batch.open(false);
            batch.drive();
        });
        assert!(shared.failed().is_none());
        assert_eq!(shared.counters().collectives, 0);
    }
}
