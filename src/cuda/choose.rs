//! The device side of [`crate::choice`]: one chooser per process (settings from the
//! environment, the file keyed to this build's kernels), the card's key, and the kernels
//! chosen by timing them on the card: the accumulation's family and the inversion's kernel.

use std::sync::{Mutex, OnceLock};

use super::accumulate::{AccumulateKernel, AccumulateMode, DeviceElement, DeviceInput};
use super::apply::{ApplyKernel, ApplyLayer};
use super::raw::InvertKernel;
use super::CudaDevice;
use crate::choice::{fingerprint, ChoiceKey, ChoiceSettings, Chooser, Decision, Trial};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::FactorSet;

/// This build as choice files record it: the crate version and a fingerprint of every
/// kernel's source (a file written by another build is stale).
pub fn build_id() -> String {
    let mut all = Vec::new();
    for m in super::kernels::MODULES {
        all.extend_from_slice(m.name.as_bytes());
        all.extend_from_slice(m.source.as_bytes());
    }
    format!(
        "thor-kernels {} kernels {:016x}",
        env!("CARGO_PKG_VERSION"),
        fingerprint(&all)
    )
}

/// The process's chooser, made from [`ChoiceSettings::from_env`] on first use.
pub fn chooser() -> &'static Mutex<Chooser> {
    static CHOOSER: OnceLock<Mutex<Chooser>> = OnceLock::new();
    CHOOSER.get_or_init(|| Mutex::new(Chooser::new(ChoiceSettings::from_env(), &build_id())))
}

/// The shape class of a grouped accumulation as choices are keyed: block size, mode, the
/// number of factors and a fingerprint of every factor's dimension and rows.
pub fn accumulate_class(set: &FactorSet, rows: &[usize], mode: AccumulateMode) -> String {
    let mut shapes = Vec::with_capacity(16 * set.len());
    for (e, &n) in set.entries().iter().zip(rows) {
        shapes.extend_from_slice(&(e.layout.dim() as u64).to_le_bytes());
        shapes.extend_from_slice(&(n as u64).to_le_bytes());
    }
    format!(
        "b={} {:?} {} factors {:016x}",
        set.block(),
        mode,
        set.len(),
        fingerprint(&shapes)
    )
}

/// Relative Frobenius difference allowed between a variant's statistics and the tile
/// kernels' on the same inputs: twice the design's tolerance against the f64 reference
/// (f32 paths and 16-bit inputs, whose products are exact in f32: 1e-5; TF32: 5e-4).
pub fn accumulate_tolerance(dtype: DType, mode: AccumulateMode) -> f64 {
    match (dtype, mode) {
        (DType::F32, AccumulateMode::TensorCore) => 1e-3,
        _ => 2e-5,
    }
}

/// Relative Frobenius difference allowed between an inversion kernel's output and the
/// standard kernel's on [`invert_trial_blocks`] (well conditioned: the kernels that share
/// the standard arithmetic agree bit for bit, the blocked one by rounding, far inside it).
pub const INVERT_TOLERANCE: f64 = 1e-6;

/// The inversion trial's `blocks` synthetic SPD blocks of `b` ([b, b] row-major each):
/// b on the diagonal, uniform values in [-1, 1) off it, symmetric (diagonally dominant),
/// the same every time.
pub fn invert_trial_blocks(b: usize, blocks: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut host = vec![0.0f32; blocks * b * b];
    for m in host.chunks_mut(b * b) {
        for i in 0..b {
            for j in 0..i {
                let v = uniform(&mut state);
                m[i * b + j] = v;
                m[j * b + i] = v;
            }
            m[i * b + i] = b as f32;
        }
    }
    host
}

/// Synthetic inputs larger than this are not made for a choice (the baseline runs, with a
/// warning): the accumulation's factors all read one buffer of the largest factor's size,
/// the inversion's trial holds all its blocks.
pub const MAX_TRIAL_BYTES: usize = 1 << 30;

impl CudaDevice {
    /// The card as choices are keyed: its name, compute capability and multiprocessors.
    pub fn card_key(&self) -> Result<String> {
        if let Some(k) = self.card.get() {
            return Ok(k.clone());
        }
        let k = format!(
            "{} sm_{} {} SMs",
            self.name()?.replace(['\t', '\n'], " "),
            self.arch(),
            self.sm_count()?
        );
        Ok(self.card.get_or_init(|| k).clone())
    }

    /// The inversion kernel for `blocks` blocks of `b` on this card: forced
    /// (`THOR_FORCE_INVERT`), else remembered, else timed now on synthetic well-conditioned
    /// SPD blocks (each eligible kernel a few times on this device's stream, checked against
    /// the standard kernel); the standard kernel when choosing is off, when it is the only
    /// one for `b`, or past [`MAX_TRIAL_BYTES`] of blocks.
    pub fn choose_invert_kernel(
        &self,
        b: usize,
        blocks: usize,
    ) -> Result<(InvertKernel, Decision)> {
        let mut chooser = chooser().lock().unwrap_or_else(|e| e.into_inner());
        self.choose_invert_kernel_in(&mut chooser, b, blocks)
    }

    /// The inversion kernel [`CudaDevice::invert`] runs for `blocks` blocks of `b`: asked of
    /// the chooser once per shape on this device, then kept (whatever the chooser said,
    /// including the baseline after a failed trial), so a training loop's calls cost a
    /// lookup.
    pub(crate) fn invert_kernel_for(&self, b: usize, blocks: usize) -> Result<InvertKernel> {
        if let Some(&k) = self
            .invert_kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(b, blocks))
        {
            return Ok(k);
        }
        let (k, _) = self.choose_invert_kernel(b, blocks)?;
        self.invert_kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((b, blocks), k);
        Ok(k)
    }

    /// [`CudaDevice::choose_invert_kernel`] with a chooser of the caller's.
    pub fn choose_invert_kernel_in(
        &self,
        chooser: &mut Chooser,
        b: usize,
        blocks: usize,
    ) -> Result<(InvertKernel, Decision)> {
        crate::layout::check_block_size(b)?;
        if blocks == 0 {
            return Err(Error::invalid("blocks", "at least one block is needed"));
        }
        let names = names_for::<InvertKernel>(b);
        let key = ChoiceKey {
            op: "invert".into(),
            card: self.card_key()?,
            class: format!("b={b} blocks={blocks}"),
            dtype: "f32".into(),
        };
        let bytes = blocks.saturating_mul(b * b * 4 * 2); // input and output
        let decision = self.decide(chooser, &key, &names, INVERT_TOLERANCE, bytes, |v| {
            self.invert_trial(b, blocks, by_name::<InvertKernel>(v)?)
        })?;
        Ok((by_name::<InvertKernel>(&decision.variant)?, decision))
    }

    /// One inversion kernel's trial on `blocks` synthetic SPD blocks of `b` (b on the
    /// diagonal, uniform values in [-1, 1) off it, symmetric: diagonally dominant), timed
    /// as [`CudaDevice::median_time`] does; the output of the last run.
    fn invert_trial(&self, b: usize, blocks: usize, kernel: InvertKernel) -> Result<Trial> {
        let host = invert_trial_blocks(b, blocks);
        let input = self.upload(&host)?;
        let mut out = self.zeros::<f32>(host.len())?;
        let mut info = self.zeros::<i32>(blocks)?;
        let opts = super::ops::DeviceInvertOptions::uniform(1e-3);
        let mut run = || self.invert_with(kernel, b, &input, &mut out, &mut info, &opts);
        let seconds = self.median_time(&mut run)?;
        let st = self.download(&info)?;
        if let Some(j) = st.iter().position(|&s| s != 0) {
            return Err(Error::invalid(
                "kernel",
                format!(
                    "{}: block {j} gave info {} on an SPD block",
                    kernel.name(),
                    st[j]
                ),
            ));
        }
        Ok(Trial {
            seconds,
            parts: self
                .download(&out)?
                .chunks(b * b)
                .map(<[f32]>::to_vec)
                .collect(),
        })
    }

    /// The apply kernel for these layers on this card: forced (`THOR_FORCE_APPLY`), else
    /// remembered, else timed now on synthetic gradients and symmetric inverse blocks of
    /// these shapes (checked layer by layer against the standard kernel); the standard
    /// kernel when choosing is off or it is the only one for the block size.
    pub fn choose_apply_kernel(
        &self,
        set: &FactorSet,
        layers: &[ApplyLayer],
        dtype: DType,
    ) -> Result<(ApplyKernel, Decision)> {
        let mut chooser = chooser().lock().unwrap_or_else(|e| e.into_inner());
        self.choose_apply_kernel_in(&mut chooser, set, layers, dtype)
    }

    /// [`CudaDevice::choose_apply_kernel`] with a chooser of the caller's.
    pub fn choose_apply_kernel_in(
        &self,
        chooser: &mut Chooser,
        set: &FactorSet,
        layers: &[ApplyLayer],
        dtype: DType,
    ) -> Result<(ApplyKernel, Decision)> {
        // The shapes are checked first, by the plan every kernel shares.
        super::apply::ApplyPlan::new(set, layers, dtype)?;
        let names = names_for::<ApplyKernel>(set.block());
        let mut shapes = Vec::with_capacity(32 * layers.len());
        for l in layers {
            for v in [
                l.out_dim,
                l.in_dim,
                l.g_factor.map_or(usize::MAX, |f| f),
                l.a_factor.map_or(usize::MAX, |f| f),
            ] {
                shapes.extend_from_slice(&(v as u64).to_le_bytes());
            }
        }
        let key = ChoiceKey {
            op: "apply".into(),
            card: self.card_key()?,
            class: format!(
                "b={} {} layers {:016x}",
                set.block(),
                layers.len(),
                fingerprint(&shapes)
            ),
            dtype: format!("{dtype:?}").to_ascii_lowercase(),
        };
        let elems: usize = layers.iter().map(|l| l.out_dim * l.in_dim).sum();
        let bytes = elems * (dtype.size() + 4) + set.buffer_len() * 4;
        let decision = match dtype {
            DType::BF16 => self.decide(chooser, &key, &names, 1e-6, bytes, |v| {
                self.apply_trial::<half::bf16>(set, layers, by_name::<ApplyKernel>(v)?)
            })?,
            _ => self.decide(chooser, &key, &names, 1e-6, bytes, |v| {
                self.apply_trial::<f32>(set, layers, by_name::<ApplyKernel>(v)?)
            })?,
        };
        Ok((by_name::<ApplyKernel>(&decision.variant)?, decision))
    }

    /// One apply kernel's trial: every layer from synthetic gradients (uniform in [-1, 1))
    /// and symmetric inverse blocks, timed as [`CudaDevice::median_time`] does; the outputs
    /// of the last run, one part per layer.
    fn apply_trial<E: DeviceElement>(
        &self,
        set: &FactorSet,
        layers: &[ApplyLayer],
        kernel: ApplyKernel,
    ) -> Result<Trial> {
        let mut state = 0x5851_f42d_4c95_7f2du64;
        let mut next = move || uniform(&mut state);
        let b = set.block();
        let mut inv = vec![0.0f32; set.buffer_len()];
        for m in inv.chunks_mut(b * b) {
            for i in 0..b {
                for j in 0..=i {
                    let v = next();
                    m[i * b + j] = v;
                    m[j * b + i] = v;
                }
            }
        }
        let inv = self.upload(&inv)?;
        let mut grads = Vec::with_capacity(layers.len());
        let mut outs = Vec::with_capacity(layers.len());
        for l in layers {
            let g: Vec<E> = (0..l.out_dim * l.in_dim)
                .map(|_| E::from_f32(next()))
                .collect();
            grads.push(self.upload(&g)?);
            outs.push(self.zeros::<f32>(l.out_dim * l.in_dim)?);
        }
        let mut plan = self.plan_apply_with(set, layers, E::DTYPE, kernel)?;
        let scales = vec![1.0f32; layers.len()];
        let mut run = || {
            let gv: Vec<_> = grads.iter().map(|g| g.as_view()).collect();
            let mut ov: Vec<_> = outs.iter_mut().map(|o| o.as_view_mut()).collect();
            self.apply(&mut plan, &inv, &gv, &mut ov, &scales)
        };
        let seconds = self.median_time(&mut run)?;
        let parts = outs
            .iter()
            .map(|o| self.download(o))
            .collect::<Result<Vec<_>>>()?;
        Ok(Trial { seconds, parts })
    }

    /// The decision for `key` among `names` (the baseline first): [`Chooser::choose`] with
    /// `trial`, except that nothing is timed while this device's stream is being captured
    /// into a graph, nor when the trial's inputs would take more than [`MAX_TRIAL_BYTES`]
    /// (`trial_bytes`); then, and when a trial of the baseline fails, the baseline runs (or a
    /// forced or remembered variant), with a warning.
    fn decide(
        &self,
        chooser: &mut Chooser,
        key: &ChoiceKey,
        names: &[&str],
        tol: f64,
        trial_bytes: usize,
        trial: impl FnMut(&str) -> Result<Trial>,
    ) -> Result<Decision> {
        if chooser.needs_trial(key, names) {
            use cudarc::driver::sys::CUstreamCaptureStatus;
            let capturing = self.stream().capture_status()?
                != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
            let why = if capturing {
                Some("the stream is being captured".to_string())
            } else if trial_bytes > MAX_TRIAL_BYTES {
                Some(format!(
                    "its inputs ({} MiB) are too large to time",
                    trial_bytes >> 20
                ))
            } else {
                None
            };
            if let Some(why) = why {
                chooser.warn(format!(
                    "{key}: not timed ({why}); the {} variant runs",
                    names[0]
                ));
                return chooser.without_trials(key, names);
            }
        }
        match chooser.choose(key, names, tol, trial) {
            Ok(d) => Ok(d),
            Err(e) => {
                chooser.warn(format!(
                    "{key}: timing the variants failed ({e}); the {} variant runs",
                    names[0]
                ));
                chooser.without_trials(key, names)
            }
        }
    }

    /// Runs `f` once (warm-up), then times it with events on this device's stream at least
    /// 3 and at most 10 times, until about 20 ms are spent; the median seconds.
    fn median_time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let ctx = self.context_handle();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
        let mut times = Vec::new();
        let mut spent = 0.0;
        while times.len() < 10 && (times.len() < 3 || spent < 0.02) {
            start.record(self.stream())?;
            f()?;
            end.record(self.stream())?;
            end.synchronize()?;
            let t = start.elapsed_ms(&end)? as f64 / 1e3;
            spent += t;
            times.push(t);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// The accumulation's kernel family for these shapes on this card: forced
    /// (`THOR_FORCE_ACCUMULATE`), else remembered, else timed now on synthetic inputs of
    /// the planned sizes (each eligible family a few times on this device's stream, the
    /// result checked against the tile kernels', see [`crate::choice`]); the tile kernels
    /// when choosing is off, when only they are eligible (b = 32, 256) or when the inputs
    /// would exceed [`MAX_TRIAL_BYTES`].
    pub fn choose_accumulate_kernel(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        mode: AccumulateMode,
    ) -> Result<(AccumulateKernel, Decision)> {
        let mut chooser = chooser().lock().unwrap_or_else(|e| e.into_inner());
        self.choose_accumulate_kernel_in(&mut chooser, set, rows, dtype, mode)
    }

    /// [`CudaDevice::choose_accumulate_kernel`] with a chooser of the caller's (its own
    /// settings and file) instead of the process's.
    pub fn choose_accumulate_kernel_in(
        &self,
        chooser: &mut Chooser,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        mode: AccumulateMode,
    ) -> Result<(AccumulateKernel, Decision)> {
        // The shapes are checked first, by the plan every family shares.
        super::accumulate::AccumulatePlan::new(set, rows, dtype, mode, 1)?;
        let names = names_for::<AccumulateKernel>(set.block());
        let key = ChoiceKey {
            op: "accumulate".into(),
            card: self.card_key()?,
            class: accumulate_class(set, rows, mode),
            dtype: format!("{dtype:?}").to_ascii_lowercase(),
        };
        let longest = set
            .entries()
            .iter()
            .zip(rows)
            .map(|(e, &n)| n.saturating_mul(e.layout.dim().next_multiple_of(8)))
            .max()
            .unwrap_or(0);
        let elem = dtype.size();
        let len = longest.saturating_add(16 * set.len());
        let bytes = len
            .saturating_mul(elem)
            .saturating_add(set.buffer_len() * 4);
        let tol = accumulate_tolerance(dtype, mode);
        let decision = match dtype {
            DType::F32 => self.decide(chooser, &key, &names, tol, bytes, |v| {
                self.accumulate_trial::<f32>(set, rows, mode, len, by_name::<AccumulateKernel>(v)?)
            })?,
            DType::F16 => self.decide(chooser, &key, &names, tol, bytes, |v| {
                self.accumulate_trial::<half::f16>(
                    set,
                    rows,
                    mode,
                    len,
                    by_name::<AccumulateKernel>(v)?,
                )
            })?,
            DType::BF16 => self.decide(chooser, &key, &names, tol, bytes, |v| {
                self.accumulate_trial::<half::bf16>(
                    set,
                    rows,
                    mode,
                    len,
                    by_name::<AccumulateKernel>(v)?,
                )
            })?,
        };
        Ok((by_name::<AccumulateKernel>(&decision.variant)?, decision))
    }

    /// One family's trial: the accumulation of every factor from one synthetic buffer
    /// (uniform values in [-1, 1), `len` elements; factor `f` reads from element `16 f`, so
    /// factors see different data), timed as [`CudaDevice::median_time`] does; the output of
    /// the last run, one part per factor.
    fn accumulate_trial<E: DeviceElement>(
        &self,
        set: &FactorSet,
        rows: &[usize],
        mode: AccumulateMode,
        len: usize,
        kernel: AccumulateKernel,
    ) -> Result<Trial> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let host: Vec<E> = (0..len.max(1))
            .map(|_| E::from_f32(uniform(&mut state)))
            .collect();
        let x = self.upload(&host)?;
        let inputs: Vec<DeviceInput<'_, E>> = set
            .entries()
            .iter()
            .zip(rows)
            .enumerate()
            .map(|(f, (e, &n))| DeviceInput {
                x: x.slice(16 * f..),
                // Rows 16-byte aligned for every type: the inputs the block kernels take.
                layout: crate::InputLayout::matrix(n, e.layout.dim().next_multiple_of(8)),
                alpha: 1.0 / n as f32,
                beta: 0.0,
            })
            .collect();
        let mut acc = self.plan_accumulate_with(set, rows, E::DTYPE, mode, kernel)?;
        let mut blocks = self.zeros::<f32>(set.buffer_len())?;
        let mut bt = self.zeros::<f32>(set.total_blocks())?;
        let mut ft = self.zeros::<f32>(set.len())?;
        let mut status = self.zeros::<i32>(set.len())?;
        let mut run = || {
            self.accumulate(
                &mut acc,
                &inputs,
                &mut blocks,
                &mut bt,
                &mut ft,
                &mut status,
            )
        };
        let seconds = self.median_time(&mut run)?;
        let st = self.download(&status)?;
        let got = self.download(&blocks)?;
        if let Some(f) = st.iter().position(|&s| s != 0) {
            return Err(Error::invalid(
                "kernel",
                format!(
                    "{}: factor {f} reported status {} on finite input",
                    kernel.name(),
                    st[f]
                ),
            ));
        }
        Ok(Trial {
            seconds,
            parts: set
                .entries()
                .iter()
                .map(|e| got[e.offset()..e.offset() + e.layout.buffer_len()].to_vec())
                .collect(),
        })
    }
}

/// The next value in [-1, 1) of a 64-bit linear congruential sequence (the trials' synthetic
/// inputs: reproducible, no generator crate).
fn uniform(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// A family of kernels for one operation, as choices name them.
pub trait KernelVariant: Copy + 'static {
    /// Every variant, the baseline first.
    const ALL: &'static [Self];
    /// The variant's stable name.
    fn name(self) -> &'static str;
    /// Whether the variant exists for block size `b`.
    fn supports(self, b: usize) -> bool;
}

macro_rules! kernel_variant {
    ($t:ty) => {
        impl KernelVariant for $t {
            const ALL: &'static [Self] = &<$t>::ALL;
            fn name(self) -> &'static str {
                <$t>::name(self)
            }
            fn supports(self, b: usize) -> bool {
                <$t>::supports(self, b)
            }
        }
    };
}
kernel_variant!(AccumulateKernel);
kernel_variant!(InvertKernel);
kernel_variant!(ApplyKernel);

/// The names of `V`'s variants for block size `b`, the baseline first.
fn names_for<V: KernelVariant>(b: usize) -> Vec<&'static str> {
    V::ALL
        .iter()
        .filter(|k| k.supports(b))
        .map(|k| k.name())
        .collect()
}

/// The variant of `V` called `v`.
fn by_name<V: KernelVariant>(v: &str) -> Result<V> {
    V::ALL
        .iter()
        .copied()
        .find(|k| k.name() == v)
        .ok_or_else(|| Error::invalid("kernel", format!("no kernel variant named {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_tell_shapes_apart() {
        let set = FactorSet::new(128, &[4608, 300]).unwrap();
        let a = accumulate_class(&set, &[8192, 100], AccumulateMode::F32);
        assert!(a.starts_with("b=128 F32 2 factors "), "{a}");
        assert_ne!(a, accumulate_class(&set, &[8192, 101], AccumulateMode::F32));
        assert_ne!(
            a,
            accumulate_class(&set, &[8192, 100], AccumulateMode::TensorCore)
        );
        let other = FactorSet::new(128, &[4608, 301]).unwrap();
        assert_ne!(
            a,
            accumulate_class(&other, &[8192, 100], AccumulateMode::F32)
        );
        assert_eq!(a, accumulate_class(&set, &[8192, 100], AccumulateMode::F32));
        assert!(build_id().starts_with("thor-kernels "));
        assert_eq!(
            by_name::<AccumulateKernel>("blocks").unwrap(),
            AccumulateKernel::Blocks
        );
        assert!(by_name::<AccumulateKernel>("nope").is_err());
    }
}
