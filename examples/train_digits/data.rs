//! Datasets for the training example: the bundled 8x8 digits (CSV, gzip) and MNIST IDX files.

use std::io::Read;
use std::path::Path;

/// A labelled image set, pixels scaled to [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `[n, features]` row-major.
    pub x: Vec<f32>,
    /// Class labels.
    pub y: Vec<u8>,
    /// Pixels per image.
    pub features: usize,
    /// Number of classes (max label + 1).
    pub classes: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// The images at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let f = self.features;
        Dataset {
            x: idx
                .iter()
                .flat_map(|&i| self.x[i * f..(i + 1) * f].iter().copied())
                .collect(),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            features: f,
            classes: self.classes,
        }
    }

    /// A fixed-seed split: `train_fraction` of the images (shuffled with `seed`) for
    /// training, the rest for testing.
    pub fn split(&self, train_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        shuffle(&mut idx, seed);
        let n_train = (self.len() as f64 * train_fraction).round() as usize;
        (self.subset(&idx[..n_train]), self.subset(&idx[n_train..]))
    }
}

/// Fisher-Yates with a SplitMix64 stream: the same permutation on every platform.
pub fn shuffle(v: &mut [usize], seed: u64) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: bad gzip data: {e}", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses the digits CSV: one image per line, 64 pixel counts 0..16 then the label.
pub fn parse_digits_csv(text: &str) -> Result<Dataset, String> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<u32> = line
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<u32>()
                    .map_err(|e| format!("line {}: {t:?}: {e}", n + 1))
            })
            .collect::<Result<_, _>>()?;
        if vals.len() != 65 {
            return Err(format!(
                "line {}: {} values, expected 65",
                n + 1,
                vals.len()
            ));
        }
        if let Some(v) = vals[..64].iter().find(|&&v| v > 16) {
            return Err(format!("line {}: pixel {v} outside 0..16", n + 1));
        }
        if vals[64] > 9 {
            return Err(format!("line {}: label {} outside 0..9", n + 1, vals[64]));
        }
        x.extend(vals[..64].iter().map(|&v| v as f32 / 16.0));
        y.push(vals[64] as u8);
    }
    if y.is_empty() {
        return Err("no images".into());
    }
    Ok(Dataset {
        x,
        y,
        features: 64,
        classes: 10,
    })
}

/// Loads the bundled digits file (`data/digits/digits.csv.gz`).
pub fn load_digits(path: &Path) -> Result<Dataset, String> {
    let bytes = read_maybe_gz(path)?;
    let text =
        String::from_utf8(bytes).map_err(|e| format!("{}: not UTF-8: {e}", path.display()))?;
    parse_digits_csv(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().unwrap()))
        .ok_or_else(|| "truncated header".to_string())
}

/// Parses an IDX file of unsigned bytes (`0x00 0x00 0x08 ndims`, big-endian dims, data):
/// returns the dimensions and the data.
pub fn parse_idx_u8(bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type {:#04x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        ));
    }
    let nd = bytes[3] as usize;
    if nd == 0 {
        return Err("IDX file with no dimensions".into());
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| be_u32(bytes, 4 + 4 * i).map(|v| v as usize))
        .collect::<Result<_, _>>()?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("IDX size overflows")?;
    let start = 4 + 4 * nd;
    if bytes.len() != start + n {
        return Err(format!(
            "IDX data has {} bytes, dimensions {dims:?} need {n}",
            bytes.len() - start.min(bytes.len())
        ));
    }
    Ok((dims, bytes[start..].to_vec()))
}

/// Loads an MNIST-style pair of IDX files (images `[n, rows, cols]`, labels `[n]`,
/// gzipped or not), pixels scaled from 0..255 to [0, 1].
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset, String> {
    let (idims, pix) =
        parse_idx_u8(&read_maybe_gz(images)?).map_err(|e| format!("{}: {e}", images.display()))?;
    let (ldims, lab) =
        parse_idx_u8(&read_maybe_gz(labels)?).map_err(|e| format!("{}: {e}", labels.display()))?;
    if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
        return Err(format!(
            "images {idims:?} and labels {ldims:?} do not pair up (need [n, h, w] and [n])"
        ));
    }
    let classes = lab.iter().copied().max().unwrap_or(0) as usize + 1;
    Ok(Dataset {
        x: pix.iter().map(|&p| p as f32 / 255.0).collect(),
        y: lab,
        features: idims[1] * idims[2],
        classes,
    })
}

/// Loads MNIST from a folder holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (each optionally `.gz`).
pub fn load_mnist_dir(dir: &Path) -> Result<(Dataset, Dataset), String> {
    let find = |stem: &str| -> Result<std::path::PathBuf, String> {
        [stem.to_string(), format!("{stem}.gz")]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("{}: no {stem} or {stem}.gz", dir.display()))
    };
    let train = load_idx(
        &find("train-images-idx3-ubyte")?,
        &find("train-labels-idx1-ubyte")?,
    )?;
    let test = load_idx(
        &find("t10k-images-idx3-ubyte")?,
        &find("t10k-labels-idx1-ubyte")?,
    )?;
    if train.features != test.features {
        return Err("train and test images differ in size".into());
    }
    Ok((train, test))
}
