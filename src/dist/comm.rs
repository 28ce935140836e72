//! The collectives a distributed step needs, and an in-process group of ranks.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::plan::{even_counts, ring_bytes, Collective};
use crate::error::{check_len, Error, Result};

/// What a rank moved, as a ring algorithm moves it (see each collective).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommCounters {
    /// Collectives completed.
    pub collectives: u64,
    /// Bytes this rank sent.
    pub bytes_sent: u64,
    /// Bytes this rank received.
    pub bytes_received: u64,
}

impl CommCounters {
    fn add(&mut self, (sent, received): (u64, u64)) {
        self.collectives += 1;
        self.bytes_sent += sent;
        self.bytes_received += received;
    }
}

/// One rank's end of a group of `world` ranks: the collectives of a distributed factor
/// step. Every rank must call the same collectives in the same order with the same
/// `counts`. A failure (a rank gone, a timeout, a mismatched call) is
/// [`Error::Communication`], after which the group is broken. An argument error on one
/// rank ([`Error::Shape`]) breaks the group too where the transport can say so
/// ([`LocalGroup`] does); elsewhere the other ranks fail when the transport's timeout
/// expires.
///
/// Implementations move the bytes (in process, NCCL, torch.distributed, ...); the
/// library does the math.
pub trait Communicator: Send + fmt::Debug {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Sums `send` over the ranks and gives this rank its segment: `send` is `world`
    /// segments back to back, segment `r` of `counts[r]` elements; `recv` receives the sum
    /// of every rank's segment `rank` (`counts[rank]` elements).
    fn reduce_scatter(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()>;
    /// Gathers every rank's `send` (`counts[r]` elements from rank `r`) into `recv`, rank
    /// 0's first.
    fn all_gather(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()>;
    /// Sums `buf` over the ranks, in place; every rank gets the same values.
    fn all_reduce(&mut self, buf: &mut [f64]) -> Result<()>;
    /// What this rank has moved so far.
    fn counters(&self) -> CommCounters;
    /// Why the group is broken, once a collective of this communicator has failed (the
    /// steps that share it then refuse to run).
    fn failed(&self) -> Option<String> {
        None
    }
    /// Tells the group this rank cannot go on (a step failed after its first collective,
    /// for a reason of its own): where the transport can, the other ranks' collectives then
    /// fail at once instead of waiting for this rank; the communicator's own later
    /// collectives fail. The default does nothing.
    fn abort(&mut self, why: &str) {
        let _ = why;
    }
}

/// One rank's communicator shared by several steps (the layers of an optimizer, each with
/// its own step): clones hand every collective to the same communicator, one at a time, so
/// that the steps' collectives keep one order on every rank.
/// A failed collective through any clone breaks them all ([`Communicator::failed`]), so that
/// every step sharing the communicator refuses to run.
#[derive(Debug, Clone)]
pub struct SharedComm(SharedCell<dyn Communicator>);

/// A communicator shared by clones ([`SharedComm`], and the device one of
/// `crate::cuda::dist`): one collective at a time, broken for good by the first failure.
#[derive(Debug)]
pub(crate) struct SharedCell<C: ?Sized>(Arc<Mutex<Sticky<C>>>);

impl<C: ?Sized> Clone for SharedCell<C> {
    fn clone(&self) -> Self {
        SharedCell(self.0.clone())
    }
}

#[derive(Debug)]
pub(crate) struct Sticky<C: ?Sized> {
    /// Why the communicator is broken (a collective through it failed, or it was aborted).
    pub(crate) failed: Option<String>,
    pub(crate) comm: Box<C>,
}

impl<C: ?Sized> SharedCell<C> {
    pub(crate) fn new(comm: Box<C>) -> Self {
        SharedCell(Arc::new(Mutex::new(Sticky { comm, failed: None })))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Sticky<C>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a collective unless the communicator failed before; a failure is kept.
    pub(crate) fn run(&self, f: impl FnOnce(&mut C) -> Result<()>) -> Result<()> {
        let mut s = self.lock();
        if let Some(why) = &s.failed {
            return Err(Error::Communication(format!(
                "an earlier collective failed ({why})"
            )));
        }
        let out = f(s.comm.as_mut());
        if let Err(e) = &out {
            s.failed = Some(e.to_string());
        }
        out
    }

    /// Marks the communicator broken (keeping an earlier reason) and hands it `abort`.
    pub(crate) fn abort(&self, why: &str, abort: impl FnOnce(&mut C, &str)) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(why.to_string());
        }
        abort(s.comm.as_mut(), why);
    }
}

impl SharedComm {
    /// Shares `comm`.
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        SharedComm(SharedCell::new(comm))
    }
}

impl Communicator for SharedComm {
    fn rank(&self) -> usize {
        self.0.lock().comm.rank()
    }
    fn world(&self) -> usize {
        self.0.lock().comm.world()
    }
    fn reduce_scatter(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.0.run(|c| c.reduce_scatter(send, counts, recv))
    }
    fn all_gather(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.0.run(|c| c.all_gather(send, counts, recv))
    }
    fn all_reduce(&mut self, buf: &mut [f64]) -> Result<()> {
        self.0.run(|c| c.all_reduce(buf))
    }
    fn counters(&self) -> CommCounters {
        self.0.lock().comm.counters()
    }
    fn failed(&self) -> Option<String> {
        let s = self.0.lock();
        s.failed.clone().or_else(|| s.comm.failed())
    }
    fn abort(&mut self, why: &str) {
        self.0.abort(why, |c, why| c.abort(why));
    }
}

/// Checks the arguments of a reduce-scatter or all-gather of rank `rank` on `world` ranks:
/// `world` counts whose sum is the length of the whole buffer (`whole`: its name and
/// length; `send` of a reduce-scatter, `recv` of an all-gather) and whose entry `rank` is
/// the length of this rank's part (`part`). For implementations of [`Communicator`].
pub fn check_counts(
    world: usize,
    rank: usize,
    counts: &[usize],
    whole: (&'static str, usize),
    part: (&'static str, usize),
) -> Result<()> {
    check_len("counts", world, counts.len())?;
    let total = counts
        .iter()
        .try_fold(0usize, |a, &c| a.checked_add(c))
        .ok_or_else(|| Error::invalid("counts", "the total overflows"))?;
    check_len(whole.0, total, whole.1)?;
    check_len(part.0, counts[rank], part.1)
}

/// A group of ranks that are threads of one process, exchanging through shared memory:
/// for tests of the distributed step, and as the reference of its semantics. Made by
/// [`LocalGroup::new`], which returns one [`LocalComm`] per rank to move to its thread.
///
/// Sums are taken in rank order, so every rank of an all-reduce gets bit-identical values.
/// A rank whose [`LocalComm`] is dropped (its thread returned or panicked) leaves the
/// group: the others' next collective that needs it fails at once; a rank that does not
/// arrive makes the others fail after the group's timeout. Each collective copies its
/// inputs (this transport is for tests, not for speed).
#[derive(Debug)]
pub struct LocalGroup;

impl LocalGroup {
    /// `world` ranks whose collectives wait at most `timeout` for the other ranks.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize, timeout: Duration) -> Result<Vec<LocalComm>> {
        if world == 0 {
            return Err(Error::invalid("world", "at least one rank is needed"));
        }
        if timeout.is_zero() {
            return Err(Error::invalid("timeout", "must be positive"));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(GroupState::default()),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
                seq: 0,
                counters: CommCounters::default(),
            })
            .collect())
    }
}

impl LocalGroup {
    /// Runs `f` on every rank of a new group, each in a thread of its own, and returns the
    /// results in rank order (a rank that panics makes this panic too, once every rank has
    /// finished). Errors as [`LocalGroup::new`].
    pub fn run<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(LocalComm) -> T + Sync,
    ) -> Result<Vec<T>> {
        let comms = Self::new(world, timeout)?;
        let f = &f;
        let joined: Vec<std::thread::Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        Ok(joined
            .into_iter()
            .map(|r| r.unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect())
    }
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<GroupState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    rounds: HashMap<u64, Round>,
    broken: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ReduceScatter,
    AllGather,
    AllReduce,
}

#[derive(Debug)]
struct Round {
    kind: Kind,
    counts: Vec<usize>,
    f32s: Vec<Option<Vec<f32>>>,
    f64s: Vec<Option<Vec<f64>>>,
    arrived: usize,
    read: usize,
}

/// One rank of a [`LocalGroup`].
#[derive(Debug)]
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    seq: u64,
    counters: CommCounters,
}

impl LocalComm {
    /// Deposits this rank's contribution to the next collective, waits for every rank's,
    /// and hands them to `read` (under the group's lock) in rank order.
    fn exchange<T>(
        &mut self,
        kind: Kind,
        counts: &[usize],
        f32s: Option<Vec<f32>>,
        f64s: Option<Vec<f64>>,
        read: impl FnOnce(&Round) -> T,
    ) -> Result<T> {
        let sh = &*self.shared;
        let seq = self.seq;
        self.seq += 1;
        let mut st: MutexGuard<'_, GroupState> = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.broken {
            return Err(Error::Communication(format!(
                "rank {}: the group is broken ({why})",
                self.rank
            )));
        }
        let round = st.rounds.entry(seq).or_insert_with(|| Round {
            kind,
            counts: counts.to_vec(),
            f32s: vec![None; sh.world],
            f64s: vec![None; sh.world],
            arrived: 0,
            read: 0,
        });
        if round.kind != kind || round.counts != counts {
            let why = format!(
                "collective #{seq}: rank {} called {kind:?} with counts {counts:?}, another rank {:?} with counts {:?}",
                self.rank, round.kind, round.counts
            );
            st.broken = Some(why.clone());
            sh.cv.notify_all();
            return Err(Error::Communication(why));
        }
        round.f32s[self.rank] = f32s;
        round.f64s[self.rank] = f64s;
        round.arrived += 1;
        sh.cv.notify_all();
        let deadline = Instant::now() + sh.timeout;
        loop {
            let round = &st.rounds[&seq];
            if round.arrived == sh.world {
                break;
            }
            if let Some(why) = &st.broken {
                return Err(Error::Communication(format!(
                    "rank {}, collective #{seq}: the group broke while waiting ({why})",
                    self.rank
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..sh.world)
                    .filter(|&r| round.f32s[r].is_none() && round.f64s[r].is_none())
                    .collect();
                let why = format!(
                    "rank {} waited {:?} at collective #{seq} ({kind:?}) for ranks {missing:?}",
                    self.rank, sh.timeout
                );
                st.broken = Some(why.clone());
                sh.cv.notify_all();
                return Err(Error::Communication(why));
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let round = st
            .rounds
            .get_mut(&seq)
            .expect("the round exists until read");
        let out = read(round);
        round.read += 1;
        if round.read == sh.world {
            st.rounds.remove(&seq);
        }
        Ok(out)
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.broken.is_none() {
            st.broken = Some(format!("rank {} left the group", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn reduce_scatter(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let (w, r) = (self.shared.world, self.rank);
        check_counts(w, r, counts, ("send", send.len()), ("recv", recv.len()))
            .map_err(|e| self.break_with(e))?;
        let start: usize = counts[..r].iter().sum();
        self.exchange(
            Kind::ReduceScatter,
            counts,
            Some(send.to_vec()),
            None,
            |round| {
                recv.fill(0.0);
                for s in round.f32s.iter().flatten() {
                    for (o, v) in recv.iter_mut().zip(&s[start..start + counts[r]]) {
                        *o += v;
                    }
                }
            },
        )?;
        self.counters
            .add(ring_bytes(Collective::ReduceScatter, counts, r, 4));
        Ok(())
    }

    fn all_gather(&mut self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let (w, r) = (self.shared.world, self.rank);
        check_counts(w, r, counts, ("recv", recv.len()), ("send", send.len()))
            .map_err(|e| self.break_with(e))?;
        self.exchange(
            Kind::AllGather,
            counts,
            Some(send.to_vec()),
            None,
            |round| {
                let mut at = 0;
                for s in round.f32s.iter().flatten() {
                    recv[at..at + s.len()].copy_from_slice(s);
                    at += s.len();
                }
            },
        )?;
        self.counters
            .add(ring_bytes(Collective::AllGather, counts, r, 4));
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut [f64]) -> Result<()> {
        let (w, r) = (self.shared.world, self.rank);
        let mut counts = vec![0usize; w];
        even_counts(buf.len(), w, &mut counts);
        self.exchange(
            Kind::AllReduce,
            &counts,
            None,
            Some(buf.to_vec()),
            |round| {
                buf.fill(0.0);
                for s in round.f64s.iter().flatten() {
                    for (o, v) in buf.iter_mut().zip(s) {
                        *o += v;
                    }
                }
            },
        )?;
        self.counters
            .add(ring_bytes(Collective::AllReduce, &counts, r, 8));
        Ok(())
    }

    fn counters(&self) -> CommCounters {
        self.counters
    }

    fn abort(&mut self, why: &str) {
        self.break_with(Error::Communication(why.to_string()));
    }
}

impl LocalComm {
    /// Marks the group broken (the other ranks' collectives fail at once instead of
    /// waiting for this rank) and returns `e`.
    fn break_with(&self, e: Error) -> Error {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.broken.is_none() {
            st.broken = Some(format!("rank {}: {e}", self.rank));
        }
        self.shared.cv.notify_all();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(LocalComm) -> T + Sync,
    ) -> Vec<T> {
        LocalGroup::run(world, timeout, f).unwrap()
    }

    #[test]
    fn collectives_sum_and_gather() {
        let out = on_ranks(3, Duration::from_secs(10), |mut c| {
            let r = c.rank();
            let counts = [2, 0, 1];
            let send: Vec<f32> = (0..3).map(|i| (10 * r + i) as f32).collect();
            let mut recv = vec![f32::NAN; counts[r]];
            c.reduce_scatter(&send, &counts, &mut recv).unwrap();
            let mine = vec![r as f32 + 1.0; counts[r]];
            let mut all = vec![f32::NAN; 3];
            c.all_gather(&mine, &counts, &mut all).unwrap();
            let mut v = [r as f64, 1.0];
            c.all_reduce(&mut v).unwrap();
            (recv, all, v, c.counters())
        });
        // Segment sums: element i over ranks is 30 + 3 i.
        assert_eq!(out[0].0, vec![30.0, 33.0]);
        assert!(out[1].0.is_empty());
        assert_eq!(out[2].0, vec![36.0]);
        for (_, all, v, cnt) in &out {
            assert_eq!(all, &vec![1.0, 1.0, 3.0]);
            assert_eq!(v, &[3.0, 3.0]);
            assert_eq!(cnt.collectives, 3);
        }
        // Rank 1 (owning nothing) sends all 3 elements of the reduce-scatter and the
        // all-gather's segments but its successor's (2 elements); the all-reduce of 2 f64
        // (segments 1, 1, 0): 1 in its reduce-scatter, 2 in its all-gather.
        assert_eq!(out[1].3.bytes_sent, 12 + 8 + (8 + 16));
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others() {
        let out = on_ranks(3, Duration::from_secs(60), |mut c| {
            if c.rank() == 1 {
                return None;
            }
            let t = Instant::now();
            let mut v = [1.0f64];
            let e = c.all_reduce(&mut v).unwrap_err();
            Some((e, t.elapsed()))
        });
        for (e, t) in out.into_iter().flatten() {
            assert!(
                matches!(&e, Error::Communication(m) if m.contains("rank 1 left")),
                "{e}"
            );
            assert!(t < Duration::from_secs(30), "{t:?}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out() {
        let out = on_ranks(2, Duration::from_millis(200), |mut c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                let mut v = [1.0f64];
                return c.all_reduce(&mut v).unwrap_err();
            }
            let mut v = [1.0f64];
            c.all_reduce(&mut v).unwrap_err()
        });
        assert!(
            matches!(&out[0], Error::Communication(m) if m.contains("for ranks [1]")),
            "{}",
            out[0]
        );
        // The late rank finds the group broken.
        assert!(
            matches!(&out[1], Error::Communication(m) if m.contains("broken")),
            "{}",
            out[1]
        );
    }

    #[test]
    fn mismatched_calls_and_bad_counts() {
        let out = on_ranks(2, Duration::from_secs(10), |mut c| {
            let mut recv = [0.0f32; 1];
            if c.rank() == 0 {
                c.reduce_scatter(&[1.0, 2.0], &[1, 1], &mut recv)
            } else {
                c.all_gather(&[1.0], &[1, 1], &mut [0.0; 2])
            }
        });
        assert!(out
            .iter()
            .all(|r| matches!(r, Err(Error::Communication(_)))));
        let mut c = LocalGroup::new(2, Duration::from_secs(1)).unwrap();
        let e = c[0]
            .reduce_scatter(&[1.0, 2.0], &[1, 2], &mut [0.0; 1])
            .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "send", .. }), "{e}");
        let e = c[0].all_gather(&[1.0], &[1], &mut [0.0; 1]).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "counts", .. }), "{e}");
        let e = LocalGroup::new(0, Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "world", .. }),
            "{e}"
        );
    }
}
