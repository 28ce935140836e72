//! Which rank owns which block, and what moving the blocks costs.

use std::fmt;

use crate::error::{Error, Result};
use crate::layout::FactorSet;

/// Elements of the packed lower triangle of a `b x b` block: `b (b + 1) / 2`.
pub fn tri_len(b: usize) -> usize {
    b * (b + 1) / 2
}

/// Packs the lower triangle of the row-major `b x b` block `block` (row by row: `(0,0)`,
/// `(1,0)`, `(1,1)`, `(2,0)`, ...) into `out` (`tri_len(b)` elements).
///
/// # Panics
/// When `block` holds fewer than `b * b` or `out` fewer than `tri_len(b)` elements (the
/// callers size both from the same `b`).
pub fn pack_lower(block: &[f32], b: usize, out: &mut [f32]) {
    let mut i = 0;
    for r in 0..b {
        out[i..i + r + 1].copy_from_slice(&block[r * b..r * b + r + 1]);
        i += r + 1;
    }
}

/// Unpacks a packed lower triangle ([`pack_lower`]) into the full symmetric row-major
/// `b x b` block `out` (the upper triangle mirrored bit for bit).
///
/// # Panics
/// As [`pack_lower`].
pub fn unpack_lower(packed: &[f32], b: usize, out: &mut [f32]) {
    let mut i = 0;
    for r in 0..b {
        for c in 0..=r {
            out[r * b + c] = packed[i];
            out[c * b + r] = packed[i];
            i += 1;
        }
    }
}

/// Every block of a factor set assigned to one of `world` ranks, balanced by inversion
/// cost, deterministic from the costs and the world size alone (every rank builds the same
/// plan on its own).
///
/// Blocks are taken from the most to the least costly (ties in block order), each given
/// to the rank with the least cost so far (ties to the lowest rank). For a [`FactorSet`],
/// whose blocks are all one size and cost the same, this is round-robin: rank `r` owns
/// blocks `r, r + world, r + 2 world, ...`, so the ranks' counts differ by at most one and
/// every layer's blocks are spread over the ranks (the all-gather of an updated layer is
/// shared by all of them). With blocks of several sizes ([`OwnershipPlan::balanced`] with
/// `b^3` costs) it is the longest-processing-time rule, within 4/3 of the best makespan.
///
/// No assignment of whole blocks can give a rank less than `ceil(blocks / world)` blocks
/// of one size, so at `world` close to the block count some ranks hold one block more than
/// the mean; [`OwnershipPlan::imbalance`] says how much.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnershipPlan {
    world: usize,
    costs: Vec<f64>,
    owner: Vec<usize>,
    /// Blocks by owner (rank 0's first), each rank's in block order.
    order: Vec<usize>,
    /// `order[starts[r]..starts[r + 1]]` are rank `r`'s blocks.
    starts: Vec<usize>,
    load: Vec<f64>,
    /// Where a rotated plan's blocks start in the model ([`OwnershipPlan::rotated`]): part
    /// of the fingerprint, so that two layers of one shape have different plans.
    origin: usize,
}

impl OwnershipPlan {
    /// The plan for every block of `set` over `world` ranks (all blocks cost `b^3`).
    pub fn new(set: &FactorSet, world: usize) -> Result<Self> {
        let b = set.block() as f64;
        Self::balanced(&vec![b * b * b; set.total_blocks()], world)
    }

    /// The plan for blocks of the given inversion costs (for example `b^3` for blocks of
    /// several sizes) over `world` ranks. Errors: `world` 0, no blocks, a cost that is not
    /// finite and positive.
    pub fn balanced(costs: &[f64], world: usize) -> Result<Self> {
        if world == 0 {
            return Err(Error::invalid("world", "at least one rank is needed"));
        }
        if costs.is_empty() {
            return Err(Error::invalid("costs", "at least one block is needed"));
        }
        if let Some(k) = costs.iter().position(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(Error::invalid(
                "costs",
                format!("block {k}: must be finite and > 0, got {}", costs[k]),
            ));
        }
        let mut by_cost: Vec<usize> = (0..costs.len()).collect();
        // Stable: equal costs stay in block order.
        by_cost.sort_by(|&x, &y| costs[y].total_cmp(&costs[x]));
        let mut load = vec![0.0f64; world];
        let mut owner = vec![0usize; costs.len()];
        for k in by_cost {
            let mut r = 0;
            for q in 1..world {
                if load[q] < load[r] {
                    r = q;
                }
            }
            owner[k] = r;
            load[r] += costs[k];
        }
        Ok(Self::from_owners(costs.to_vec(), owner, world))
    }

    /// The plan that gives block `k` to `owner[k]`.
    fn from_owners(costs: Vec<f64>, owner: Vec<usize>, world: usize) -> Self {
        let mut starts = vec![0usize; world + 1];
        let mut load = vec![0.0f64; world];
        for (k, &r) in owner.iter().enumerate() {
            starts[r + 1] += 1;
            load[r] += costs[k];
        }
        for r in 0..world {
            starts[r + 1] += starts[r];
        }
        let mut next = starts.clone();
        let mut order = vec![0usize; owner.len()];
        for (k, &r) in owner.iter().enumerate() {
            order[next[r]] = k;
            next[r] += 1;
        }
        OwnershipPlan {
            world,
            costs,
            owner,
            order,
            starts,
            load,
            origin: 0,
        }
    }

    /// The same plan with every block moved from rank `r` to rank `(r + first) % world`:
    /// for a model whose layers each run their own step, rotating each layer's plan by the
    /// blocks before it spreads the whole model round-robin over the ranks.
    pub fn rotated(&self, first: usize) -> Self {
        let w = self.world;
        let owner = self.owner.iter().map(|&r| (r + first % w) % w).collect();
        Self {
            origin: first,
            ..Self::from_owners(self.costs.clone(), owner, w)
        }
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.owner.len()
    }

    /// A fingerprint of the ownership (world size, every block's owner and, for a rotated
    /// plan, where it starts; FNV-1a folded to 32 bits, so that its sum over any number of
    /// ranks is exact in an f64): the distributed steps check that every rank runs the same
    /// plan, and so the same layer.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let head = [self.world, self.origin];
        for v in head.into_iter().chain(self.owner.iter().copied()) {
            for byte in (v as u64).to_le_bytes() {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        (h >> 32) ^ (h & 0xffff_ffff)
    }

    /// The rank that owns block `k` (`k < blocks()`).
    pub fn owner(&self, k: usize) -> usize {
        self.owner[k]
    }

    /// Every block, rank 0's first, each rank's in block order: the order of the
    /// reduce-scatter's send buffer.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// The blocks rank `rank` owns, in block order (empty for a rank past the world).
    pub fn owned(&self, rank: usize) -> &[usize] {
        if rank >= self.world {
            return &[];
        }
        &self.order[self.starts[rank]..self.starts[rank + 1]]
    }

    /// The inversion cost each rank owns.
    pub fn loads(&self) -> &[f64] {
        &self.load
    }

    /// The largest rank's cost over the mean, minus one (0 for a perfect balance).
    pub fn imbalance(&self) -> f64 {
        let total: f64 = self.costs.iter().sum();
        let max = self.load.iter().cloned().fold(0.0, f64::max);
        max / (total / self.world as f64) - 1.0
    }

    /// Per rank, the elements it receives from a reduce-scatter (or sends to an
    /// all-gather) of `per_block` elements for each of its blocks that `include` keeps,
    /// written to `counts` (`world` entries).
    pub fn counts(&self, per_block: usize, include: impl Fn(usize) -> bool, counts: &mut [usize]) {
        for (r, c) in counts.iter_mut().enumerate().take(self.world) {
            *c = self.owned(r).iter().filter(|&&k| include(k)).count() * per_block;
        }
    }

    /// Bytes rank `rank` sends in one statistics step with blocks of `b x b` f32 elements,
    /// as a ring moves them: the reduce-scatter of the packed lower triangle of every block
    /// `sent` keeps (the distributed step leaves frozen factors out), and the all-gather of
    /// the packed inverse (and its info word) of every block `updated` keeps.
    /// `(reduce-scatter bytes, all-gather bytes)`; 0 for a rank past the world.
    pub fn bytes_sent(
        &self,
        rank: usize,
        b: usize,
        sent: impl Fn(usize) -> bool,
        updated: impl Fn(usize) -> bool,
    ) -> (u64, u64) {
        if rank >= self.world {
            return (0, 0);
        }
        let tri = tri_len(b);
        let mut counts = vec![0usize; self.world];
        self.counts(tri, sent, &mut counts);
        let scatter = ring_bytes(Collective::ReduceScatter, &counts, rank, 4).0;
        self.counts(tri + 1, updated, &mut counts);
        let gather = ring_bytes(Collective::AllGather, &counts, rank, 4).0;
        (scatter, gather)
    }
}

impl fmt::Display for OwnershipPlan {
    /// One line per rank: its block count, its cost and its share of the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: f64 = self.costs.iter().sum();
        writeln!(
            f,
            "{} blocks over {} ranks (largest rank {:+.2}% over the mean)",
            self.blocks(),
            self.world,
            100.0 * self.imbalance()
        )?;
        for r in 0..self.world {
            writeln!(
                f,
                "  rank {r:>4}: {:>6} blocks, cost {:.4e} ({:.2}%)",
                self.owned(r).len(),
                self.load[r],
                100.0 * self.load[r] / total
            )?;
        }
        Ok(())
    }
}

/// A collective, for [`ring_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// Rank `r` ends with the sum of every rank's segment `r`.
    ReduceScatter,
    /// Every rank ends with every rank's segment.
    AllGather,
    /// Every rank ends with the sum of everything (a reduce-scatter then an all-gather).
    AllReduce,
}

/// `(sent, received)` bytes of rank `rank` in a ring collective over segments of
/// `counts[r]` elements of `elem` bytes. In a ring reduce-scatter rank `r` sends every
/// segment but its own and receives every segment but its predecessor's; in an all-gather
/// it sends every segment but its successor's and receives every segment but its own.
/// `(0, 0)` for one rank, or for a rank past `counts`.
pub fn ring_bytes(op: Collective, counts: &[usize], rank: usize, elem: usize) -> (u64, u64) {
    let w = counts.len();
    if w <= 1 || rank >= w {
        return (0, 0);
    }
    let total: usize = counts.iter().sum();
    let (pred, succ) = ((rank + w - 1) % w, (rank + 1) % w);
    let bytes = |n: usize| (n * elem) as u64;
    match op {
        Collective::ReduceScatter => (bytes(total - counts[rank]), bytes(total - counts[pred])),
        Collective::AllGather => (bytes(total - counts[succ]), bytes(total - counts[rank])),
        Collective::AllReduce => {
            let rs = ring_bytes(Collective::ReduceScatter, counts, rank, elem);
            let ag = ring_bytes(Collective::AllGather, counts, rank, elem);
            (rs.0 + ag.0, rs.1 + ag.1)
        }
    }
}

/// `n` elements split into `w` segments as evenly as possible (the first `n % w` one
/// longer), as a ring all-reduce splits its buffer, written to `counts`.
pub fn even_counts(n: usize, w: usize, counts: &mut [usize]) {
    for (r, c) in counts.iter_mut().enumerate().take(w) {
        *c = n / w + usize::from(r < n % w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip() {
        let b = 5;
        let mut s = vec![0.0f32; b * b];
        for r in 0..b {
            for c in 0..=r {
                let v = (r * 10 + c) as f32;
                s[r * b + c] = v;
                s[c * b + r] = v;
            }
        }
        let mut p = vec![f32::NAN; tri_len(b)];
        pack_lower(&s, b, &mut p);
        assert_eq!(&p[..4], &[0.0, 10.0, 11.0, 20.0]);
        let mut out = vec![f32::NAN; b * b];
        unpack_lower(&p, b, &mut out);
        assert_eq!(out, s);
    }

    #[test]
    fn equal_costs_are_round_robin() {
        let set = FactorSet::new(32, &[100, 40, 33]).unwrap();
        let nb = set.total_blocks();
        assert_eq!(nb, 4 + 2 + 2);
        let p = OwnershipPlan::new(&set, 3).unwrap();
        for k in 0..nb {
            assert_eq!(p.owner(k), k % 3);
        }
        assert_eq!(p.owned(0), &[0, 3, 6]);
        assert_eq!(p.owned(2), &[2, 5]);
        assert_eq!(p.order(), &[0, 3, 6, 1, 4, 7, 2, 5]);
        assert!(p.owned(3).is_empty());
        let q = p.rotated(4);
        assert_eq!(q.owned(1), &[0, 3, 6]);
        assert_eq!(q.owned(0), &[2, 5]);
        assert_eq!(q.loads()[1], p.loads()[0]);
        assert_eq!(
            p.rotated(usize::MAX).owned(0),
            p.rotated(usize::MAX % 3).owned(0)
        );
        // A world larger than the set: the last ranks own nothing.
        let p = OwnershipPlan::new(&set, 11).unwrap();
        assert_eq!(p.owned(7), &[7]);
        assert!(p.owned(8).is_empty());
    }

    #[test]
    fn mixed_costs_are_balanced() {
        // Blocks of 256 and of 64 (cost b^3): 3 big and 130 small on 4 ranks.
        let mut costs = vec![256f64.powi(3); 3];
        costs.extend(std::iter::repeat_n(64f64.powi(3), 130));
        let p = OwnershipPlan::balanced(&costs, 4).unwrap();
        let total: f64 = costs.iter().sum();
        let max = p.loads().iter().cloned().fold(0.0, f64::max);
        assert!(max <= total / 4.0 * 1.02, "{p}");
        // Deterministic.
        assert_eq!(p, OwnershipPlan::balanced(&costs, 4).unwrap());
    }

    #[test]
    fn bad_plans_are_refused() {
        let e = OwnershipPlan::balanced(&[1.0], 0).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "world", .. }),
            "{e}"
        );
        let e = OwnershipPlan::balanced(&[], 2).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "costs", .. }),
            "{e}"
        );
        let e = OwnershipPlan::balanced(&[1.0, f64::NAN], 2).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "costs", .. }),
            "{e}"
        );
        let e = OwnershipPlan::balanced(&[1.0, 0.0], 2).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "costs", .. }),
            "{e}"
        );
    }

    #[test]
    fn layers_of_one_shape_have_different_fingerprints() {
        // Two layers of 2 blocks each on 2 ranks: rotated by 0 and by 2, their owners are
        // the same; where they start tells them apart.
        let set = FactorSet::new(32, &[64]).unwrap();
        let p = OwnershipPlan::new(&set, 2).unwrap();
        let (a, b) = (p.rotated(0), p.rotated(2));
        assert_eq!(
            (0..2).map(|k| a.owner(k)).collect::<Vec<_>>(),
            (0..2).map(|k| b.owner(k)).collect::<Vec<_>>()
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), p.rotated(0).fingerprint());
        assert!(a.fingerprint() < 1 << 32);
    }

    #[test]
    fn ring_bytes_by_hand() {
        // Segments 3, 1, 2 (elements of 4 bytes) on 3 ranks.
        let c = [3, 1, 2];
        assert_eq!(ring_bytes(Collective::ReduceScatter, &c, 0, 4), (12, 16));
        assert_eq!(ring_bytes(Collective::ReduceScatter, &c, 1, 4), (20, 12));
        assert_eq!(ring_bytes(Collective::AllGather, &c, 0, 4), (20, 12));
        assert_eq!(ring_bytes(Collective::AllGather, &c, 2, 4), (12, 16));
        assert_eq!(ring_bytes(Collective::AllReduce, &c, 0, 4), (32, 28));
        assert_eq!(ring_bytes(Collective::AllGather, &[5], 0, 4), (0, 0));
        assert_eq!(ring_bytes(Collective::AllGather, &c, 3, 4), (0, 0));
        // What every rank sends, every rank receives.
        for op in [Collective::ReduceScatter, Collective::AllGather] {
            let sent: u64 = (0..3).map(|r| ring_bytes(op, &c, r, 4).0).sum();
            let recv: u64 = (0..3).map(|r| ring_bytes(op, &c, r, 4).1).sum();
            assert_eq!(sent, recv);
        }
        let mut e = [0; 4];
        even_counts(10, 4, &mut e);
        assert_eq!(e, [3, 3, 2, 2]);
    }
}
