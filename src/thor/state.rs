//! Saving and loading the optimizer state: a versioned little-endian format with a
//! checksum, written atomically (temporary file, then rename).
//!
//! Layout: magic `THORSTAT`, format version (u32), then the body, then an FNV-1a 64-bit
//! checksum of everything before it. The body holds the step position and, per layer, its
//! shape, flags, counters, last trace, and its factors and inverses as f32 arrays.

use std::io::Write;
use std::path::Path;

use super::{LayerCounters, LayerKind, Thor};
use crate::error::{Error, Result};
use crate::rule::{RuleState, FACTOR_FROZEN, FACTOR_HAS_STATS};
use crate::step::StepSnapshot;

const MAGIC: &[u8; 8] = b"THORSTAT";
/// The format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f32s(&mut self, expected: usize) -> Result<Vec<f32>> {
        let n = self.u64()? as usize;
        if n != expected {
            return Err(corrupt(&format!(
                "array of {n} values where the layout needs {expected}"
            )));
        }
        let bytes = self.take(n.checked_mul(4).ok_or_else(|| corrupt("size overflow"))?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
}

fn corrupt(what: &str) -> Error {
    Error::invalid("state", format!("not a valid optimizer state file: {what}"))
}

fn kind_words(k: &LayerKind) -> [u64; 6] {
    match *k {
        LayerKind::Linear {
            inputs,
            outputs,
            bias,
        } => [0, inputs as u64, outputs as u64, 0, 0, bias as u64],
        LayerKind::Conv2d {
            c_in,
            c_out,
            kh,
            kw,
            bias,
        } => [
            1,
            c_in as u64,
            c_out as u64,
            kh as u64,
            kw as u64,
            bias as u64,
        ],
    }
}

/// One layer as the file holds it: flags, rule state, counters and the four arrays.
struct Saved {
    flags: u64,
    rule: RuleState,
    counters: LayerCounters,
    a_stats: Vec<f32>,
    g_stats: Vec<f32>,
    a_inv: Vec<f32>,
    g_inv: Vec<f32>,
}

impl Saved {
    /// The layer's state from its engine's snapshot (the layer's A factor first, then G).
    fn of(s: &StepSnapshot, a_len: usize) -> Saved {
        let rule = s.rule[0];
        let has_stats = s.factor_state[0] & FACTOR_HAS_STATS != 0;
        Saved {
            flags: has_stats as u64 | (rule.prev.is_some() as u64) << 1 | (rule.frozen as u64) << 2,
            rule,
            counters: s.counters[0],
            a_stats: s.stats[..a_len].to_vec(),
            g_stats: s.stats[a_len..].to_vec(),
            a_inv: s.inverses[..a_len].to_vec(),
            g_inv: s.inverses[a_len..].to_vec(),
        }
    }

    /// The engine's snapshot of this layer.
    fn snapshot(self) -> StepSnapshot {
        let has = (self.flags & 1 != 0) as u8 * FACTOR_HAS_STATS;
        let frozen = self.rule.frozen as u8 * FACTOR_FROZEN;
        let mut stats = self.a_stats;
        stats.extend_from_slice(&self.g_stats);
        let mut inverses = self.a_inv;
        inverses.extend_from_slice(&self.g_inv);
        StepSnapshot {
            stats,
            inverses,
            factor_state: vec![has | frozen; 2],
            rule: vec![self.rule],
            counters: vec![self.counters],
        }
    }
}

/// The values of a loaded layer are ones the optimizer can reach: finite statistics and
/// inverses, a finite last trace when there is one, counters that add up (every accepted
/// statistics step updated, failed, reused or froze; at most one freeze, and the frozen flag
/// with it), statistics exactly when some were accepted, no unknown flag.
fn check_layer(i: usize, l: &Saved) -> Result<()> {
    let bad = |what: &str| corrupt(&format!("layer {i}: {what}"));
    if l.flags & !7 != 0 {
        return Err(bad("unknown flags"));
    }
    if [&l.a_stats, &l.g_stats, &l.a_inv, &l.g_inv]
        .iter()
        .any(|v| v.iter().any(|x| !x.is_finite()))
    {
        return Err(bad("non-finite statistics or inverses"));
    }
    if l.rule.prev.is_some_and(|p| !p.is_finite()) {
        return Err(bad("non-finite last trace"));
    }
    let c = &l.counters;
    let decided = [c.updates, c.failed_inversions, c.reuses, c.freezes]
        .iter()
        .try_fold(0u64, |s, &v| s.checked_add(v));
    let has_stats = l.flags & 1 != 0;
    if decided != Some(c.statistics)
        || c.freezes > 1
        || l.rule.frozen != (c.freezes == 1)
        || has_stats != (c.statistics > 0)
    {
        return Err(bad("counters that do not add up"));
    }
    Ok(())
}

impl Thor {
    /// The whole state as bytes (see the module docs for the format). On a CUDA backend
    /// the layers' state comes down from the device (waiting for queued work).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(MAGIC);
        w.0.extend_from_slice(&STATE_VERSION.to_le_bytes());
        w.u64(self.cfg.block as u64);
        w.u64(self.layers.len() as u64);
        w.u64(self.step);
        w.u64(self.next_stats);
        w.f64(self.epoch);
        for l in &self.layers {
            let snap = l.engine.snapshot(&self.backend)?;
            let a_len = l.a.buffer_len();
            let saved = Saved::of(&snap, a_len);
            for v in kind_words(&l.kind) {
                w.u64(v);
            }
            w.u64(saved.flags);
            for v in saved.counters.to_array() {
                w.u64(v);
            }
            w.f64(saved.rule.prev.unwrap_or(f64::NAN));
            for v in [&saved.a_stats, &saved.g_stats, &saved.a_inv, &saved.g_inv] {
                w.f32s(v);
            }
        }
        let sum = fnv1a(&w.0);
        w.u64(sum);
        Ok(w.0)
    }

    /// Restores a state produced by [`Thor::to_bytes`] for the same layers (same order and
    /// shapes) and block size. On any error (truncated, corrupted, another version, other
    /// layers) nothing changes.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() < MAGIC.len() + 4 + 8 || &bytes[..8] != MAGIC {
            return Err(corrupt("missing header"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != STATE_VERSION {
            return Err(Error::invalid(
                "state",
                format!("format version {version}; this build reads version {STATE_VERSION}"),
            ));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        if fnv1a(body) != u64::from_le_bytes(tail.try_into().unwrap()) {
            return Err(corrupt("checksum mismatch (truncated or corrupted)"));
        }
        let mut r = Reader { buf: body, pos: 12 };
        let block = r.u64()? as usize;
        let n = r.u64()? as usize;
        if block != self.cfg.block || n != self.layers.len() {
            return Err(Error::invalid(
                "state",
                format!(
                    "saved for {n} layers at block {block}; this optimizer has {} layers at block {}",
                    self.layers.len(),
                    self.cfg.block
                ),
            ));
        }
        let (step, next_stats, epoch) = (r.u64()?, r.u64()?, r.f64()?);
        // A checksum only says the bytes are the ones written; the values must also be ones
        // an optimizer can hold.
        if !(epoch.is_finite() && epoch >= 0.0) {
            return Err(corrupt(&format!("epoch {epoch} is not a finite position")));
        }
        let mut saved: Vec<Saved> = Vec::with_capacity(n);
        for (i, cur) in self.layers.iter().enumerate() {
            let mut words = [0u64; 6];
            for w in &mut words {
                *w = r.u64()?;
            }
            if words != kind_words(&cur.kind) {
                return Err(Error::invalid(
                    "state",
                    format!("layer {i} was saved with another shape than {:?}", cur.kind),
                ));
            }
            let flags = r.u64()?;
            let mut words6 = [0u64; 6];
            for v in &mut words6 {
                *v = r.u64()?;
            }
            let c = LayerCounters::from_array(words6);
            let prev_trace = r.f64()?;
            let l = Saved {
                flags,
                rule: RuleState {
                    prev: (flags & 2 != 0).then_some(prev_trace),
                    frozen: flags & 4 != 0,
                },
                counters: c,
                a_stats: r.f32s(cur.a.buffer_len())?,
                g_stats: r.f32s(cur.g.buffer_len())?,
                a_inv: r.f32s(cur.a.buffer_len())?,
                g_inv: r.f32s(cur.g.buffer_len())?,
            };
            check_layer(i, &l)?;
            saved.push(l);
        }
        if r.pos != body.len() {
            return Err(corrupt("trailing bytes"));
        }
        // Everything checked: hand the layers to their engines.
        for (l, s) in self.layers.iter_mut().zip(saved) {
            l.engine.restore(&self.backend, &s.snapshot())?;
        }
        self.step = step;
        self.next_stats = next_stats;
        self.epoch = epoch;
        Ok(())
    }

    /// Saves the state to `path` atomically: a temporary file beside it, flushed to disk,
    /// then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let io = |e: std::io::Error| Error::invalid("path", format!("{}: {e}", path.display()));
        let tmp = path.with_extension(format!(
            "{}tmp{}",
            path.extension()
                .map(|e| e.to_string_lossy() + ".")
                .unwrap_or_default(),
            std::process::id()
        ));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        // A failure at any point leaves `path` as it was and no temporary file behind.
        written
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io(e)
            })
    }

    /// Loads a state saved by [`Thor::save`]; on any error nothing changes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::invalid("path", format!("{}: {e}", path.display())))?;
        self.load_bytes(&bytes)
    }
}
