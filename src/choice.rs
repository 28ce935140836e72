//! Run-time choice among kernel variants, remembered per card.
//!
//! Some operations have more than one kernel (the accumulation's tile and block kernels,
//! say), and which is fastest depends on the card, the shapes and the element type. A
//! [`Chooser`] settles it on the card itself: on first use for a [`ChoiceKey`] (operation,
//! card, shape class, element type) it runs every eligible variant on the caller's data,
//! checks each against the baseline (the library's first kernel for that operation) part by
//! part, keeps the fastest one that agrees, did not fail and beats the baseline by
//! [`MARGIN`], and records the choice in a small text file, so later runs on the same card
//! start from it. A variant that fails or disagrees on the trial's inputs is never chosen,
//! and is reported. The trial's inputs are synthetic, of the planned sizes: the check is a
//! guard against a variant that is broken on this card, not a proof for every input.
//!
//! Settings ([`ChoiceSettings::from_env`]):
//! - `THOR_CHOICES`: the file (default `$XDG_CACHE_HOME/thor-kernels/choices.txt`, else
//!   `~/.cache/thor-kernels/choices.txt`); `off` turns choosing off (the baseline always,
//!   nothing timed, nothing written: bit-for-bit the same kernels on every machine, unless
//!   a variant is forced);
//!   `memory` keeps choices for the process only. A choice can change results by
//!   rounding (variants that agree within the check's tolerance, not bit for bit: the
//!   tensor-core accumulation, the blocked inversion), so a timed choice may differ from
//!   card to card; `off`, or a forced variant, keeps results reproducible.
//! - `THOR_FORCE_<OP>` (`THOR_FORCE_ACCUMULATE=blocks`, `THOR_FORCE_INVERT=blocked`,
//!   `THOR_FORCE_APPLY=conflict_free`): that variant, untimed, wherever it is eligible
//!   (elsewhere a warning, and the choice is made as usual).
//!
//! The file is never trusted blindly: one whose checksum does not match or that does not
//! parse (corrupt) is ignored as a whole with a warning and rewritten at the next choice;
//! choices made by another version of the library or of its kernels (stale) are never used
//! (they stay in the file for that build; a file holding only those is reported); an entry
//! naming a variant the operation does not have, or that is not eligible for the shapes at
//! hand, is ignored with a warning. A choice made while a variant failed (perhaps for a
//! passing reason) is used by the process that made it and not written.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a choice is for: one operation on one card, for one class of shapes and one
/// element type. Fields are free text without tabs or newlines.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChoiceKey {
    /// The operation ("accumulate").
    pub op: String,
    /// The card: its name, compute capability and multiprocessor count.
    pub card: String,
    /// The shape class (for the accumulation: block size, mode and the rows and
    /// dimensions of every factor).
    pub class: String,
    /// The element type of the inputs ("f32", "bf16", ...).
    pub dtype: String,
}

impl fmt::Display for ChoiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} ({}, {})",
            self.op, self.card, self.class, self.dtype
        )
    }
}

/// How a variant came to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceSource {
    /// Choosing is off, or only the baseline is eligible.
    Baseline,
    /// Forced by `THOR_FORCE_<OP>` or [`ChoiceSettings::force`].
    Forced,
    /// Read from the file (or from this process's earlier choice).
    Remembered,
    /// Timed just now.
    Measured,
}

/// One variant's trial: its time, or why it was not chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialReport {
    /// The variant's name.
    pub variant: String,
    /// Median seconds per run, when it ran and agreed with the baseline.
    pub seconds: Option<f64>,
    /// Why it cannot be chosen (failed, disagreed with the baseline), if so.
    pub rejected: Option<String>,
}

/// The outcome of [`Chooser::choose`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The variant to use.
    pub variant: String,
    /// How it was chosen.
    pub source: ChoiceSource,
    /// Every variant's trial (measured choices only; empty otherwise).
    pub trials: Vec<TrialReport>,
}

/// What one trial of a variant gives back: its median time over a few runs and its output,
/// to be compared with the baseline's part by part (a factor, a block, a layer: so that a
/// small part that is wrong is not hidden by a large one that is right).
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// Median seconds per run.
    pub seconds: f64,
    /// The output of one run (the same inputs for every variant), in parts.
    pub parts: Vec<Vec<f32>>,
}

/// A variant's trial, by name.
type TrialFn<'a> = dyn FnMut(&str) -> Result<Trial> + 'a;

/// How much faster than the baseline another variant must be to be chosen: 3% (a timing
/// taken once is remembered for good, so noise must not decide).
pub const MARGIN: f64 = 0.03;

/// Where choices are kept and which are forced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceSettings {
    /// False: always the baseline, nothing timed (`THOR_CHOICES=off`).
    pub enabled: bool,
    /// The file choices are read from and written to; `None`: this process only.
    pub file: Option<PathBuf>,
    /// Forced variants by operation (`THOR_FORCE_ACCUMULATE=blocks`).
    pub forced: BTreeMap<String, String>,
}

impl Default for ChoiceSettings {
    /// Choosing on, this process only, nothing forced.
    fn default() -> Self {
        ChoiceSettings {
            enabled: true,
            file: None,
            forced: BTreeMap::new(),
        }
    }
}

impl ChoiceSettings {
    /// The settings the environment gives (see the module docs). `THOR_CHOICES` of `off`,
    /// `0`, `false` or `none` (any case) turns choosing off; variables that are not valid
    /// Unicode, and empty forced values, are ignored.
    pub fn from_env() -> Self {
        let mut s = ChoiceSettings::default();
        match std::env::var_os("THOR_CHOICES") {
            Some(v) if v.is_empty() => s.file = default_file(),
            Some(v) => match v.to_str().map(str::to_ascii_lowercase).as_deref() {
                Some("off" | "0" | "false" | "none") => s.enabled = false,
                Some("memory") => {}
                _ => s.file = Some(PathBuf::from(v)),
            },
            None => s.file = default_file(),
        }
        for (k, v) in std::env::vars_os() {
            let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
                continue;
            };
            if let Some(op) = k.strip_prefix("THOR_FORCE_") {
                s = s.force(op, v);
            }
        }
        s
    }

    /// These settings with `variant` forced for `op` (both compared in lower case; an
    /// empty variant forces nothing).
    pub fn force(mut self, op: &str, variant: &str) -> Self {
        let v = variant.trim().to_ascii_lowercase();
        if !v.is_empty() {
            self.forced.insert(op.to_ascii_lowercase(), v);
        }
        self
    }
}

fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("thor-kernels").join("choices.txt"))
}

const MAGIC: &str = "thor-kernels choices 2";

/// FNV-1a, 64 bits: the file's checksum and the kernels' fingerprint.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Chooses variants and remembers the choices (see the module docs).
#[derive(Debug)]
pub struct Chooser {
    settings: ChoiceSettings,
    build: String,
    entries: BTreeMap<ChoiceKey, String>,
    /// Choices made with a variant failing: used by this process, never written.
    unsaved: std::collections::BTreeSet<ChoiceKey>,
    /// The file's choices of other builds of the library: kept in the file, never used.
    others: BTreeMap<(String, ChoiceKey), String>,
    warnings: Vec<String>,
}

impl Chooser {
    /// A chooser for a library build identified by `build` (its version and a fingerprint
    /// of its kernels: choices another build made are stale, kept in the file for that
    /// build but never used). Reads the file, if any; a corrupt one is ignored with a
    /// warning ([`Chooser::warnings`]), as is one holding only other builds' choices.
    pub fn new(settings: ChoiceSettings, build: &str) -> Self {
        let mut c = Chooser {
            settings,
            build: build.replace(['\t', '\n', '\r'], " "),
            entries: BTreeMap::new(),
            unsaved: Default::default(),
            others: BTreeMap::new(),
            warnings: Vec::new(),
        };
        if c.settings.enabled {
            if let Some(path) = c.settings.file.clone() {
                match std::fs::read_to_string(&path) {
                    Ok(text) => match parse(&text, &c.build) {
                        Ok((ours, others)) => {
                            if ours.is_empty() && !others.is_empty() {
                                c.warn(format!(
                                    "ignoring the kernel choices in {}: stale ({} made by other \
                                     builds of the library, none by {})",
                                    path.display(),
                                    others.len(),
                                    c.build
                                ));
                            }
                            c.entries = ours;
                            c.others = others;
                        }
                        Err(why) => c.warn(format!(
                            "ignoring the kernel choices in {}: {why}",
                            path.display()
                        )),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => c.warn(format!(
                        "cannot read the kernel choices in {}: {e}",
                        path.display()
                    )),
                }
            }
        }
        c
    }

    /// The settings.
    pub fn settings(&self) -> &ChoiceSettings {
        &self.settings
    }

    /// Warnings so far (a stale or corrupt file, ignored entries, rejected variants, a file
    /// that could not be written); each was also printed to standard error.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The remembered choice for `key`, if any.
    pub fn remembered(&self, key: &ChoiceKey) -> Option<&str> {
        self.entries.get(&clean(key)).map(String::as_str)
    }

    /// Prints `msg` to standard error and records it in [`Chooser::warnings`], once per
    /// distinct message.
    pub fn warn(&mut self, msg: String) {
        if self.warnings.contains(&msg) {
            return;
        }
        eprintln!("thor-kernels: {msg}");
        self.warnings.push(msg);
    }

    /// Whether [`Chooser::choose`] would run trials for `key` among `eligible` (nothing
    /// eligible is forced or remembered, choosing is on, there is more than one variant).
    pub fn needs_trial(&self, key: &ChoiceKey, eligible: &[&str]) -> bool {
        let key = clean(key);
        let usable = |v: Option<&String>| v.is_some_and(|v| eligible.contains(&v.as_str()));
        self.settings.enabled
            && eligible.len() > 1
            && !usable(self.settings.forced.get(&key.op.to_ascii_lowercase()))
            && !usable(self.entries.get(&key))
    }

    /// The baseline's decision for `key` among `eligible` without running anything: forced,
    /// else remembered, else the baseline (for when nothing may be timed now, e.g. while a
    /// stream is being captured).
    pub fn without_trials(&mut self, key: &ChoiceKey, eligible: &[&str]) -> Result<Decision> {
        self.choose_inner(key, eligible, 0.0, None)
    }

    /// The variant to use for `key` among `eligible` (names; the first is the baseline,
    /// the library's first kernel for the operation). Forced, else remembered, else
    /// measured: `trial(v)` runs variant `v` on the caller's data a few times and gives its
    /// median time and output. The baseline runs first; another variant is chosen only when
    /// it ran, its output is finite and within `tol` (relative Frobenius error) of the
    /// baseline's, and it was faster. A baseline that fails fails the choice (with its
    /// error); other failures are reported and their variants passed over. A measured
    /// choice is written to the file (a failed write is a warning, never an error).
    pub fn choose(
        &mut self,
        key: &ChoiceKey,
        eligible: &[&str],
        tol: f64,
        mut trial: impl FnMut(&str) -> Result<Trial>,
    ) -> Result<Decision> {
        self.choose_inner(key, eligible, tol, Some(&mut trial))
    }

    fn choose_inner(
        &mut self,
        key: &ChoiceKey,
        eligible: &[&str],
        tol: f64,
        trial: Option<&mut TrialFn<'_>>,
    ) -> Result<Decision> {
        let key = &clean(key);
        let Some(&baseline) = eligible.first() else {
            return Err(Error::invalid("eligible", "no variant to choose from"));
        };
        let decision = |variant: &str, source| Decision {
            variant: variant.to_string(),
            source,
            trials: Vec::new(),
        };
        if let Some(forced) = self
            .settings
            .forced
            .get(&key.op.to_ascii_lowercase())
            .cloned()
        {
            if eligible.contains(&forced.as_str()) {
                return Ok(decision(&forced, ChoiceSource::Forced));
            }
            self.warn(format!(
                "the forced {} variant {forced} is not eligible for {key} ({}); choosing instead",
                key.op,
                eligible.join(", ")
            ));
        }
        if !self.settings.enabled || eligible.len() == 1 {
            return Ok(decision(baseline, ChoiceSource::Baseline));
        }
        if let Some(v) = self.entries.get(key).cloned() {
            if eligible.contains(&v.as_str()) {
                return Ok(decision(&v, ChoiceSource::Remembered));
            }
            self.warn(format!(
                "ignoring the remembered choice {v} for {key}: not eligible here ({})",
                eligible.join(", ")
            ));
        }
        let Some(trial) = trial else {
            return Ok(decision(baseline, ChoiceSource::Baseline));
        };
        let base = trial(baseline)?;
        let mut trials = vec![TrialReport {
            variant: baseline.to_string(),
            seconds: Some(base.seconds),
            rejected: None,
        }];
        let mut best = (base.seconds, baseline);
        let mut failed = false;
        for &v in &eligible[1..] {
            let verdict = match trial(v) {
                Err(e) => {
                    failed = true;
                    Err(format!("failed: {e}"))
                }
                Ok(t) => match agreement(&t.parts, &base.parts) {
                    Some(err) if err <= tol => Ok(t.seconds),
                    Some(err) => Err(format!(
                        "disagrees with {baseline}: relative error {err:.3e} > {tol:.1e}"
                    )),
                    None => Err(format!(
                        "its output is not finite or not shaped as the baseline's \
                         ({} values, {baseline} gave {})",
                        t.parts.iter().map(Vec::len).sum::<usize>(),
                        base.parts.iter().map(Vec::len).sum::<usize>()
                    )),
                },
            };
            match verdict {
                Ok(s) => {
                    // Faster than the best so far, and by the margin than the baseline.
                    if s < best.0 && s < base.seconds * (1.0 - MARGIN) {
                        best = (s, v);
                    }
                    trials.push(TrialReport {
                        variant: v.to_string(),
                        seconds: Some(s),
                        rejected: None,
                    });
                }
                Err(why) => {
                    self.warn(format!("variant {v} of {key} not chosen: {why}"));
                    trials.push(TrialReport {
                        variant: v.to_string(),
                        seconds: None,
                        rejected: Some(why),
                    });
                }
            }
        }
        let chosen = best.1.to_string();
        self.entries.insert(key.clone(), chosen.clone());
        if failed {
            self.unsaved.insert(key.clone());
            // A failure may have been passing (memory, say): remembered for this process
            // only, tried again by the next.
            self.warn(format!(
                "the choice for {key} is not written to the file: a variant failed"
            ));
        } else {
            self.unsaved.remove(key);
            self.save();
        }
        Ok(Decision {
            variant: chosen,
            source: ChoiceSource::Measured,
            trials,
        })
    }

    /// Writes every choice to the file: under a lock file, the file is read again and the
    /// other writers' choices of this build kept (ours win on the same key), then a
    /// temporary file of a unique name is renamed over it.
    fn save(&mut self) {
        let Some(path) = self.settings.file.clone() else {
            return;
        };
        let r = with_lock(&path, || {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok((ours, others)) = parse(&text, &self.build) {
                    for (k, v) in ours {
                        self.entries.entry(k).or_insert(v);
                    }
                    for (k, v) in others {
                        self.others.entry(k).or_insert(v);
                    }
                }
            }
            let mine = self
                .entries
                .iter()
                .filter(|(k, _)| !self.unsaved.contains(*k));
            write_file(&path, &render(mine, &self.others, &self.build))
        });
        if let Err(e) = r {
            self.warn(format!(
                "cannot write the kernel choices to {}: {e}",
                path.display()
            ));
        }
    }
}

/// The key with tabs and newlines (the file's separators) turned into spaces.
fn clean(key: &ChoiceKey) -> ChoiceKey {
    let c = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    ChoiceKey {
        op: c(&key.op),
        card: c(&key.card),
        class: c(&key.class),
        dtype: c(&key.dtype),
    }
}

/// Runs `f` holding `PATH.lock` (made with create_new, removed afterwards even if `f`
/// panics; one older than 10 s, or dated in the future, is a dead writer's and is taken
/// over; gives up after 2 s of waiting, whatever the reason).
fn with_lock<T>(path: &Path, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    use std::time::{Duration, Instant, SystemTime};
    struct Held(PathBuf);
    impl Drop for Held {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock = path.with_extension("lock");
    let start = Instant::now();
    let _held = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => break Held(lock.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if start.elapsed() > Duration::from_secs(2) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!("{} is held by another writer", lock.display()),
                    ));
                }
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .map(|t| match SystemTime::now().duration_since(t) {
                        Ok(age) => age > Duration::from_secs(10),
                        Err(_) => true, // dated in the future
                    })
                    .unwrap_or(false);
                if !(stale && std::fs::remove_file(&lock).is_ok()) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(e) => return Err(e),
        }
    };
    f()
}

fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let tmp = path.with_extension(format!(
        "tmp{}-{nanos:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// The largest relative Frobenius error of a part of `out` against the same part of
/// `base`, or `None` when the parts' sizes differ or `out` holds a non-finite value.
fn agreement(out: &[Vec<f32>], base: &[Vec<f32>]) -> Option<f64> {
    if out.len() != base.len() {
        return None;
    }
    let mut worst = 0.0f64;
    for (o, b) in out.iter().zip(base) {
        if o.len() != b.len() || o.iter().chain(b).any(|v| !v.is_finite()) {
            return None;
        }
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&x, &y) in o.iter().zip(b) {
            num += (x as f64 - y as f64).powi(2);
            den += (y as f64).powi(2);
        }
        worst = worst.max(if den > 0.0 {
            (num / den).sqrt()
        } else {
            num.sqrt()
        });
    }
    Some(worst)
}

/// Choices of one build, and of others, by key.
type Parsed = (
    BTreeMap<ChoiceKey, String>,
    BTreeMap<(String, ChoiceKey), String>,
);

/// The file: a header, one line per choice (build, operation, card, class, element type,
/// variant; tab-separated), a checksum of everything before it.
fn render<'a>(
    ours: impl Iterator<Item = (&'a ChoiceKey, &'a String)>,
    others: &BTreeMap<(String, ChoiceKey), String>,
    build: &str,
) -> String {
    let mut body = format!("{MAGIC}\n");
    let line = |b: &str, k: &ChoiceKey, v: &str| {
        format!("{b}\t{}\t{}\t{}\t{}\t{v}\n", k.op, k.card, k.class, k.dtype)
    };
    for ((b, k), v) in others {
        if b != build {
            body.push_str(&line(b, k, v));
        }
    }
    for (k, v) in ours {
        body.push_str(&line(build, k, v));
    }
    let sum = fingerprint(body.as_bytes());
    body.push_str(&format!("checksum\t{sum:016x}\n"));
    body
}

fn parse(text: &str, build: &str) -> std::result::Result<Parsed, String> {
    let (body, last) = match text.trim_end_matches('\n').rsplit_once('\n') {
        Some((body, last)) => (format!("{body}\n"), last),
        None => return Err("corrupt: no checksum line".into()),
    };
    let want = last
        .strip_prefix("checksum\t")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or("corrupt: no checksum line")?;
    if fingerprint(body.as_bytes()) != want {
        return Err("corrupt: the checksum does not match".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(MAGIC) {
        return Err("corrupt: not a kernel choice file of this format".into());
    }
    let (mut ours, mut others) = (BTreeMap::new(), BTreeMap::new());
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let [b, op, card, class, dtype, variant] = f[..] else {
            return Err(format!(
                "corrupt: line {} has {} fields, not 6",
                n + 2,
                f.len()
            ));
        };
        if variant.is_empty() {
            return Err(format!("corrupt: line {} names no variant", n + 2));
        }
        let key = ChoiceKey {
            op: op.into(),
            card: card.into(),
            class: class.into(),
            dtype: dtype.into(),
        };
        if b == build {
            ours.insert(key, variant.to_string());
        } else {
            others.insert((b.to_string(), key), variant.to_string());
        }
    }
    Ok((ours, others))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(class: &str) -> ChoiceKey {
        ChoiceKey {
            op: "accumulate".into(),
            card: "NVIDIA H200 sm_90 132 SMs".into(),
            class: class.into(),
            dtype: "f32".into(),
        }
    }

    fn file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("thor-choice-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("choices.txt")
    }

    fn settings(path: &Path) -> ChoiceSettings {
        ChoiceSettings {
            file: Some(path.to_path_buf()),
            ..ChoiceSettings::default()
        }
    }

    /// The two variants most tests choose between.
    const TWO: [&str; 2] = ["tiles", "blocks"];

    /// A variant's name and its trial's time and output (`None`: it fails).
    type Row<'a> = (&'a str, Option<(f64, Vec<f32>)>);

    /// Trials with the given times and outputs; counts runs.
    fn trials<'a>(
        table: &'a [Row<'a>],
        runs: &'a mut Vec<String>,
    ) -> impl FnMut(&str) -> Result<Trial> + 'a {
        move |v: &str| {
            runs.push(v.to_string());
            match table
                .iter()
                .find(|(n, _)| *n == v)
                .and_then(|(_, t)| t.clone())
            {
                Some((seconds, output)) => Ok(Trial {
                    seconds,
                    parts: vec![vec![1.0; 4], output],
                }),
                None => Err(Error::invalid("variant", format!("{v} failed to launch"))),
            }
        }
    }

    #[test]
    fn fastest_agreeing_variant_is_chosen_and_remembered() {
        let path = file("remember");
        let table = [
            ("tiles", Some((2.0e-3, vec![1.0, 2.0, 3.0]))),
            ("blocks", Some((1.0e-3, vec![1.0, 2.0, 3.0 + 1e-6]))),
        ];
        let mut runs = Vec::new();
        let mut c = Chooser::new(settings(&path), "v1 k1");
        let d = c
            .choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("blocks", ChoiceSource::Measured)
        );
        assert_eq!(d.trials.len(), 2);
        assert_eq!(runs, ["tiles", "blocks"], "the baseline runs first");
        // A new chooser of the same build reads it back, untimed.
        let mut runs = Vec::new();
        let mut c = Chooser::new(settings(&path), "v1 k1");
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let d = c
            .choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("blocks", ChoiceSource::Remembered)
        );
        assert!(runs.is_empty());
        // Another shape class is measured afresh.
        let d = c
            .choose(&key("b"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(d.source, ChoiceSource::Measured);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn wrong_or_failing_variants_are_never_chosen_and_reported() {
        let base = vec![1.0, -2.0, 3.0];
        for (name, out, why) in [
            ("wrong", Some((1e-6, vec![1.0, -2.0, 3.1])), "disagrees"),
            ("nan", Some((1e-6, vec![1.0, f32::NAN, 3.0])), "not finite"),
            (
                "short",
                Some((1e-6, vec![1.0, -2.0])),
                "not shaped as the baseline's",
            ),
            ("fails", None, "failed"),
        ] {
            let table = [("tiles", Some((1.0, base.clone()))), (name, out)];
            let mut runs = Vec::new();
            let mut c = Chooser::new(ChoiceSettings::default(), "b");
            let d = c
                .choose(
                    &key(name),
                    &["tiles", name],
                    1e-5,
                    trials(&table, &mut runs),
                )
                .unwrap();
            assert_eq!(d.variant, "tiles", "{name}");
            let r = d.trials[1].rejected.as_deref().unwrap();
            assert!(r.contains(why), "{name}: {r}");
            assert!(c
                .warnings()
                .iter()
                .any(|w| w.contains(name) && w.contains(why)));
        }
        // A failing baseline fails the choice.
        let table = [("tiles", None), ("blocks", Some((1.0, base)))];
        let mut runs = Vec::new();
        let mut c = Chooser::new(ChoiceSettings::default(), "b");
        let e = c
            .choose(&key("x"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "variant", .. }),
            "{e}"
        );
    }

    #[test]
    fn slower_or_barely_faster_variants_lose_to_the_baseline() {
        for (t, want) in [(1.5e-3, "tiles"), (0.99e-3, "tiles"), (0.95e-3, "blocks")] {
            let table = [
                ("tiles", Some((1.0e-3, vec![4.0]))),
                ("blocks", Some((t, vec![4.0]))),
            ];
            let mut runs = Vec::new();
            let mut c = Chooser::new(ChoiceSettings::default(), "b");
            let d = c
                .choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
                .unwrap();
            assert_eq!(d.variant, want, "{t}");
            assert_eq!(d.trials[1].seconds, Some(t));
        }
    }

    #[test]
    fn a_choice_with_a_failed_variant_is_not_written() {
        let path = file("failed");
        let table = [("tiles", Some((1.0, vec![4.0]))), ("blocks", None)];
        let mut runs = Vec::new();
        let mut c = Chooser::new(settings(&path), "b");
        let d = c
            .choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("tiles", ChoiceSource::Measured)
        );
        assert!(!path.exists(), "nothing written");
        assert_eq!(
            c.remembered(&key("a")),
            Some("tiles"),
            "remembered in memory"
        );
        // Nor later, when another choice of the same chooser is written.
        let ok1 = [
            ("tiles", Some((2.0, vec![4.0]))),
            ("blocks", Some((1.0, vec![4.0]))),
        ];
        c.choose(&key("b"), &TWO, 1e-5, trials(&ok1, &mut runs))
            .unwrap();
        let later = Chooser::new(settings(&path), "b");
        assert_eq!(later.remembered(&key("b")), Some("blocks"));
        assert_eq!(later.remembered(&key("a")), None);
        // Two choosers on one file keep each other's choices.
        let ok = [
            ("tiles", Some((2.0, vec![4.0]))),
            ("blocks", Some((1.0, vec![4.0]))),
        ];
        let mut one = Chooser::new(settings(&path), "b");
        let mut two = Chooser::new(settings(&path), "b");
        one.choose(&key("x"), &TWO, 1e-5, trials(&ok, &mut runs))
            .unwrap();
        two.choose(&key("y"), &TWO, 1e-5, trials(&ok, &mut runs))
            .unwrap();
        let three = Chooser::new(settings(&path), "b");
        assert_eq!(three.remembered(&key("x")), Some("blocks"));
        assert_eq!(three.remembered(&key("y")), Some("blocks"));
        // Separators in a key do not break the file.
        let mut odd = key("tab\there");
        odd.card.push('\n');
        let mut four = Chooser::new(settings(&path), "b");
        four.choose(&odd, &TWO, 1e-5, trials(&ok, &mut runs))
            .unwrap();
        let five = Chooser::new(settings(&path), "b");
        assert!(five.warnings().is_empty(), "{:?}", five.warnings());
        assert_eq!(five.remembered(&odd), Some("blocks"));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn stale_corrupt_or_foreign_files_are_ignored_with_a_warning() {
        let path = file("stale");
        let table = [
            ("tiles", Some((2.0, vec![1.0]))),
            ("blocks", Some((1.0, vec![1.0]))),
        ];
        let mut runs = Vec::new();
        let mut c = Chooser::new(settings(&path), "v1 kA");
        c.choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        // Another build of the kernels: stale, reported, not used; its own choices join
        // the first build's in the file, each used by its build only.
        let mut c = Chooser::new(settings(&path), "v1 kB");
        assert!(c.remembered(&key("a")).is_none());
        assert!(c.warnings()[0].contains("stale"), "{:?}", c.warnings());
        assert!(c.needs_trial(&key("a"), &TWO));
        c.choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        let a = Chooser::new(settings(&path), "v1 kA");
        assert!(a.warnings().is_empty(), "{:?}", a.warnings());
        assert_eq!(a.remembered(&key("a")), Some("blocks"));
        assert!(!a.needs_trial(&key("a"), &TWO));
        assert!(
            a.needs_trial(&key("a"), &["tiles", "other"]),
            "remembered but not eligible"
        );
        std::fs::write(&path, &good).unwrap();
        // An edited entry (checksum no longer matches), a truncated file, garbage.
        for (label, text) in [
            ("edited", good.replace("blocks", "tiles")),
            ("truncated", good[..good.len() / 2].to_string()),
            ("garbage", "\u{0}\u{1}not a file\n".to_string()),
            ("empty", String::new()),
        ] {
            std::fs::write(&path, &text).unwrap();
            let c = Chooser::new(settings(&path), "v1 kA");
            assert!(c.remembered(&key("a")).is_none(), "{label}");
            assert!(
                c.warnings().iter().any(|w| w.contains("corrupt")),
                "{label}: {:?}",
                c.warnings()
            );
        }
        // A resealed entry naming a variant that is not eligible here: ignored, remeasured.
        let bogus: BTreeMap<ChoiceKey, String> = [(key("a"), "bogus".to_string())].into();
        std::fs::write(&path, render(bogus.iter(), &BTreeMap::new(), "v1 kA")).unwrap();
        let mut c = Chooser::new(settings(&path), "v1 kA");
        assert_eq!(c.remembered(&key("a")), Some("bogus"));
        let mut runs = Vec::new();
        let d = c
            .choose(&key("a"), &TWO, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("blocks", ChoiceSource::Measured)
        );
        assert!(c.warnings()[0].contains("bogus"));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn off_forced_and_unwritable() {
        let table = [
            ("tiles", Some((2.0, vec![1.0]))),
            ("blocks", Some((1.0, vec![1.0]))),
        ];
        let eligible = ["tiles", "blocks"];
        // Off: the baseline, nothing run.
        let off = ChoiceSettings {
            enabled: false,
            ..ChoiceSettings::default()
        };
        let mut runs = Vec::new();
        let d = Chooser::new(off, "b")
            .choose(&key("a"), &eligible, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("tiles", ChoiceSource::Baseline)
        );
        // Forced: that variant, nothing run; a forced variant that is not eligible is an error.
        let forced = ChoiceSettings::default().force("accumulate", "blocks");
        let d = Chooser::new(forced.clone(), "b")
            .choose(&key("a"), &eligible, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("blocks", ChoiceSource::Forced)
        );
        // A forced variant that is not eligible here: a warning, and the choice as usual.
        let mut c = Chooser::new(forced, "b");
        let d = c
            .choose(&key("a"), &["tiles"], 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(
            (d.variant.as_str(), d.source),
            ("tiles", ChoiceSource::Baseline)
        );
        assert!(
            c.warnings()[0].contains("not eligible"),
            "{:?}",
            c.warnings()
        );
        // Settings: case and blanks do not matter, an empty value forces nothing.
        let s = ChoiceSettings::default()
            .force("ACCUMULATE", " Blocks ")
            .force("invert", "");
        assert_eq!(
            s.forced.get("accumulate").map(String::as_str),
            Some("blocks")
        );
        assert!(!s.forced.contains_key("invert"));
        assert!(runs.is_empty());
        // A file that cannot be written: a warning, the choice stands.
        let blocker = file("unwritable");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, "a file where a directory should be").unwrap();
        let mut c = Chooser::new(settings(&blocker.join("choices.txt")), "b");
        let d = c
            .choose(&key("a"), &eligible, 1e-5, trials(&table, &mut runs))
            .unwrap();
        assert_eq!(d.variant, "blocks");
        assert!(c.warnings().iter().any(|w| w.contains("cannot write")));
        let _ = std::fs::remove_dir_all(blocker.parent().unwrap());
    }
}
