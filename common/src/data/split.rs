//! The seeded validation split and per-epoch training order.
//!
//! Both come from [`SplitMix64`], written out here rather than taken from a crate: a resumed
//! run recomputes the split and the order from the seed, so they must never change with a
//! dependency's version.

use crate::error::{Error, Result};

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and good enough to shuffle data.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by rejection so that no value is favoured.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Distinct streams for the split and for each epoch's order from one user seed.
fn stream(seed: u64, purpose: u64) -> SplitMix64 {
    let mut mix = SplitMix64::new(seed ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03));
    SplitMix64::new(mix.next_u64())
}

const SPLIT_STREAM: u64 = 1;
const EPOCH_STREAM: u64 = 2;

/// Splits `items` into (train, validation) with `val_size` validation items drawn at random
/// by `seed`; each side keeps the items' original relative order. At least one training item
/// must remain.
pub fn split_validation<T>(items: Vec<T>, val_size: usize, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if val_size >= items.len() {
        return Err(Error::Input(format!(
            "--val-size {val_size} leaves no training pairs: there are only {} pairs",
            items.len()
        )));
    }
    let mut indices: Vec<usize> = (0..items.len()).collect();
    stream(seed, SPLIT_STREAM).shuffle(&mut indices);
    let mut is_val = vec![false; items.len()];
    for &i in &indices[..val_size] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::with_capacity(val_size));
    for (item, v) in items.into_iter().zip(is_val) {
        if v {
            val.push(item);
        } else {
            train.push(item);
        }
    }
    Ok((train, val))
}

/// The order in which epoch `epoch` visits `n` training items: a permutation of `0..n` that
/// depends only on (`n`, `seed`, `epoch`).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    stream(seed, EPOCH_STREAM.wrapping_add(epoch << 8)).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_values() {
        // First outputs for seed 1234567 of the reference C implementation (Vigna).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn the_split_is_seeded_disjoint_and_order_preserving() {
        let items: Vec<u32> = (0..100).collect();
        let (train, val) = split_validation(items.clone(), 20, 7).unwrap();
        assert_eq!((train.len(), val.len()), (80, 20));
        assert!(val.windows(2).all(|w| w[0] < w[1]) && train.windows(2).all(|w| w[0] < w[1]));
        let mut all = [train.clone(), val.clone()].concat();
        all.sort();
        assert_eq!(all, items);
        assert_eq!(split_validation(items.clone(), 20, 7).unwrap().1, val);
        assert_ne!(split_validation(items.clone(), 20, 8).unwrap().1, val);
        assert!(split_validation(items, 100, 7)
            .unwrap_err()
            .to_string()
            .contains("no training pairs"));
    }

    #[test]
    fn epochs_get_different_reproducible_permutations() {
        let a = epoch_order(50, 3, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 3, 0));
        assert_ne!(a, epoch_order(50, 3, 1));
        assert_ne!(a, epoch_order(50, 4, 0));
    }
}
