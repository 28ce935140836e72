//! The bundled MNIST subset: rows of 784 pixels (0..255) and a label, gzipped CSV.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Images scaled to [0, 1] and their labels.
pub struct Split {
    pixels: Vec<f32>,
    labels: Vec<u32>,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Images `idx` as `[n, 784]` and their labels `[n]` on `dev`.
    pub fn batch(&self, idx: &[usize], dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(idx.len() * 784);
        for &i in idx {
            x.extend_from_slice(&self.pixels[i * 784..(i + 1) * 784]);
        }
        let y: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        Ok((
            Tensor::from_vec(x, (idx.len(), 784), dev)?,
            Tensor::from_vec(y, idx.len(), dev)?,
        ))
    }

    /// A stratified split: `per_class` images of each class for training (chosen with
    /// `seed`), the rest for testing.
    pub fn split(&self, per_class: usize, seed: u64) -> (Split, Split) {
        let order = permutation(self.len(), seed);
        let mut taken = [0usize; 10];
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for i in order {
            let c = self.labels[i] as usize;
            if taken[c] < per_class {
                taken[c] += 1;
                train.push(i);
            } else {
                test.push(i);
            }
        }
        train.sort_unstable();
        test.sort_unstable();
        (self.subset(&train), self.subset(&test))
    }

    fn subset(&self, idx: &[usize]) -> Split {
        let mut pixels = Vec::with_capacity(idx.len() * 784);
        for &i in idx {
            pixels.extend_from_slice(&self.pixels[i * 784..(i + 1) * 784]);
        }
        Split {
            pixels,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Reads the gzipped CSV.
pub fn load(path: &Path) -> Result<Split, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: Vec<u32> = line
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: line {}: {e}", path.display(), n + 1))?;
        if v.len() != 785 || v[..784].iter().any(|&p| p > 255) || v[784] > 9 {
            return Err(format!(
                "{}: line {}: expected 784 pixels in 0..=255 and a label in 0..=9",
                path.display(),
                n + 1
            ));
        }
        pixels.extend(v[..784].iter().map(|&p| p as f32 / 255.0));
        labels.push(v[784]);
    }
    Ok(Split { pixels, labels })
}

/// A permutation of `0..n` (Fisher-Yates over SplitMix64: the same on every platform).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}
