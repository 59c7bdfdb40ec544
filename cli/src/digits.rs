//! The UCI optical-recognition handwritten digits (1797 images of 8×8 pixels,
//! values 0–16, ten classes), as shipped inside the `smartcore` crate: no
//! download at run time. Features are scaled to [0, 1].

use kdfuse::error::{invalid, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Pixels per image.
pub const FEATURES: usize = 64;
/// Number of classes (the digits 0–9).
pub const CLASSES: usize = 10;

/// Images and labels, row-major `[len × FEATURES]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// Pixel intensities in [0, 1], `FEATURES` per image.
    pub x: Vec<f32>,
    /// The digit of each image, in `0..CLASSES`.
    pub y: Vec<i64>,
}

impl Digits {
    /// All 1797 images, in the data set's order.
    pub fn load() -> Self {
        let ds = smartcore::dataset::digits::load_dataset();
        debug_assert_eq!(ds.num_features, FEATURES);
        Digits {
            x: ds.data.iter().map(|&v| v / 16.0).collect(),
            y: ds.target.iter().map(|&t| t as i64).collect(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The images at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Digits {
        Digits {
            x: idx
                .iter()
                .flat_map(|&i| self.x[i * FEATURES..(i + 1) * FEATURES].iter().copied())
                .collect(),
            y: idx.iter().map(|&i| self.y[i]).collect(),
        }
    }

    /// A random split into `train` images and the rest, fixed by `seed`.
    pub fn split(&self, train: usize, seed: u64) -> Result<(Digits, Digits)> {
        if train == 0 || train >= self.len() {
            return invalid(
                "train",
                format!("must be in [1, {}), got {train}", self.len()),
            );
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        Ok((self.select(&idx[..train]), self.select(&idx[train..])))
    }

    /// The same images without class `class`.
    pub fn without_class(&self, class: i64) -> Digits {
        let idx: Vec<usize> = (0..self.len()).filter(|&i| self.y[i] != class).collect();
        self.select(&idx)
    }

    /// Images per class.
    pub fn class_counts(&self) -> [usize; CLASSES] {
        let mut c = [0; CLASSES];
        for &y in &self.y {
            c[y as usize] += 1;
        }
        c
    }
}
