//! Train/validation splits and the per-epoch shuffle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{ClassNames, DatasetError, Labels, SetIds, SetName};

/// How images are divided into training and validation.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitStrategy {
    /// Per class, `val_fraction` of the images (rounded, at least one for every class with two
    /// or more images, never all of them) go to validation, chosen at random from `seed`.
    Stratified { val_fraction: f64, seed: u64 },
    /// The official lists of `setid.mat`: images in the `train` sets train, those in the
    /// `validate` sets validate.
    Official {
        train: Vec<SetName>,
        validate: Vec<SetName>,
    },
}

impl Default for SplitStrategy {
    fn default() -> Self {
        SplitStrategy::Stratified {
            val_fraction: 0.2,
            seed: 42,
        }
    }
}

impl SplitStrategy {
    /// The official split as published: train on `trnid`, validate on `valid`.
    pub fn official() -> Self {
        SplitStrategy::Official {
            train: vec![SetName::Trnid],
            validate: vec![SetName::Valid],
        }
    }
}

/// The image numbers of each part, ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
    /// Official split only: ids listed in a used set that are not among the images.
    pub absent: usize,
    /// Official split only: images that are in none of the used sets (so in neither part).
    pub unused: usize,
}

/// Domains that keep the random streams of different uses apart under one seed.
const SPLIT_STREAM: u64 = 1;
const EPOCH_STREAM: u64 = 2;

fn rng(seed: u64, domain: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&domain.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Splits `images` (image number, 0-based label). `set_ids` is needed for
/// [`SplitStrategy::Official`]. The result depends only on the set of images, not their order.
pub fn split_images<I>(
    images: I,
    strategy: &SplitStrategy,
    set_ids: Option<&SetIds>,
) -> Result<Split, DatasetError>
where
    I: IntoIterator<Item = (u32, u32)>,
{
    match strategy {
        SplitStrategy::Stratified { val_fraction, seed } => {
            stratified(images, *val_fraction, *seed)
        }
        SplitStrategy::Official { train, validate } => {
            let set_ids = set_ids
                .ok_or_else(|| DatasetError::Split("the official split needs setid.mat".into()))?;
            official(images, train, validate, set_ids)
        }
    }
}

fn stratified<I>(images: I, val_fraction: f64, seed: u64) -> Result<Split, DatasetError>
where
    I: IntoIterator<Item = (u32, u32)>,
{
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(DatasetError::Split(format!(
            "validation fraction must be in (0, 1), got {val_fraction}"
        )));
    }
    let mut by_class: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (number, label) in images {
        by_class.entry(label).or_default().push(number);
    }
    let mut split = Split::default();
    for (label, mut numbers) in by_class {
        numbers.sort_unstable();
        numbers.dedup();
        let n = numbers.len();
        let n_val = if n < 2 {
            0
        } else {
            ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1)
        };
        // A stream per class: a class's choice does not depend on which other classes exist.
        numbers.shuffle(&mut rng(seed, SPLIT_STREAM, label as u64));
        split.validation.extend_from_slice(&numbers[..n_val]);
        split.train.extend_from_slice(&numbers[n_val..]);
    }
    split.train.sort_unstable();
    split.validation.sort_unstable();
    Ok(split)
}

fn official<I>(
    images: I,
    train_sets: &[SetName],
    validate_sets: &[SetName],
    set_ids: &SetIds,
) -> Result<Split, DatasetError>
where
    I: IntoIterator<Item = (u32, u32)>,
{
    if train_sets.is_empty() {
        return Err(DatasetError::Split("no set chosen for training".into()));
    }
    if let Some(both) = train_sets.iter().find(|s| validate_sets.contains(s)) {
        return Err(DatasetError::Split(format!(
            "set {both} is chosen for both training and validation"
        )));
    }
    let ids = |sets: &[SetName]| -> BTreeSet<u32> {
        sets.iter()
            .flat_map(|&s| set_ids.get(s).iter().copied())
            .collect()
    };
    let (train_ids, validate_ids) = (ids(train_sets), ids(validate_sets));
    if let Some(n) = train_ids.intersection(&validate_ids).next() {
        return Err(DatasetError::Split(format!(
            "image {n} is listed in both a training and a validation set"
        )));
    }
    let present: BTreeSet<u32> = images.into_iter().map(|(number, _)| number).collect();
    let mut split = Split::default();
    for &number in &present {
        if train_ids.contains(&number) {
            split.train.push(number);
        } else if validate_ids.contains(&number) {
            split.validation.push(number);
        } else {
            split.unused += 1;
        }
    }
    split.absent =
        train_ids.len() + validate_ids.len() - split.train.len() - split.validation.len();
    Ok(split)
}

/// The training order of `epoch`: a permutation of `images` determined by (`seed`, `epoch`).
pub fn epoch_order(images: &[u32], seed: u64, epoch: u64) -> Vec<u32> {
    let mut order = images.to_vec();
    order.shuffle(&mut rng(seed, EPOCH_STREAM, epoch));
    order
}

impl Split {
    /// Per-part and per-class image counts for the start-up log.
    pub fn summary(&self, labels: &Labels, names: Option<&ClassNames>) -> String {
        let mut counts: HashMap<u32, [usize; 2]> = HashMap::new();
        for (part, numbers) in [&self.train, &self.validation].into_iter().enumerate() {
            for &number in numbers {
                if let Some(label) = labels.label_of(number) {
                    counts.entry(label).or_default()[part] += 1;
                }
            }
        }
        let mut out = format!(
            "split: {} train, {} validation, {} listed but absent from the archive, {} in no used set\n",
            self.train.len(),
            self.validation.len(),
            self.absent,
            self.unused
        );
        out.push_str("class  train  val  name\n");
        for label in 0..labels.num_classes() {
            let [train, val] = counts.get(&label).copied().unwrap_or_default();
            let name = names.and_then(|n| n.name(label)).unwrap_or("");
            let _ = writeln!(out, "{:>5}  {train:>5}  {val:>3}  {name}", label + 1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per_class[c]` images of class c, numbered consecutively from 1.
    fn images(per_class: &[usize]) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        for (label, &n) in per_class.iter().enumerate() {
            for _ in 0..n {
                out.push((out.len() as u32 + 1, label as u32));
            }
        }
        out
    }

    #[test]
    fn stratified_keeps_proportions_per_class() {
        let imgs = images(&[40, 40, 10, 3, 2, 1]);
        let split = split_images(imgs.clone(), &SplitStrategy::default(), None).unwrap();
        let val_of = |label: u32| {
            imgs.iter()
                .filter(|(n, l)| *l == label && split.validation.contains(n))
                .count()
        };
        assert_eq!(
            (0..6).map(val_of).collect::<Vec<_>>(),
            [8, 8, 2, 1, 1, 0],
            "20% rounded, at least one when a class has two images, none of a singleton"
        );
        assert_eq!(split.train.len() + split.validation.len(), imgs.len());
        let mut all: Vec<u32> = split
            .train
            .iter()
            .chain(&split.validation)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            imgs.len(),
            "parts are disjoint and cover everything"
        );
    }

    #[test]
    fn stratified_is_deterministic_and_seeded() {
        let imgs = images(&[30, 25, 20]);
        let s = SplitStrategy::Stratified {
            val_fraction: 0.2,
            seed: 7,
        };
        let a = split_images(imgs.clone(), &s, None).unwrap();
        let mut reversed = imgs.clone();
        reversed.reverse();
        assert_eq!(a, split_images(reversed, &s, None).unwrap());
        let other = SplitStrategy::Stratified {
            val_fraction: 0.2,
            seed: 8,
        };
        assert_ne!(a, split_images(imgs.clone(), &other, None).unwrap());
        // A class's validation images do not depend on which other classes are present.
        let only_first: Vec<_> = imgs.iter().copied().filter(|(_, l)| *l == 0).collect();
        let alone = split_images(only_first, &s, None).unwrap();
        let first_val: Vec<u32> = a.validation.iter().copied().filter(|&n| n <= 30).collect();
        assert_eq!(alone.validation, first_val);

        let bad = SplitStrategy::Stratified {
            val_fraction: 1.0,
            seed: 1,
        };
        assert!(split_images(imgs, &bad, None).is_err());
    }

    #[test]
    fn official_uses_the_chosen_sets_and_counts_absent_ids() {
        let sets = SetIds::new(vec![1, 2, 3, 9], vec![4, 5, 10], vec![6, 7]);
        // Image 8 is in no set; 9 and 10 are listed but not in the archive.
        let imgs: Vec<(u32, u32)> = (1..=8).map(|n| (n, n % 2)).collect();
        let split = split_images(imgs.clone(), &SplitStrategy::official(), Some(&sets)).unwrap();
        assert_eq!(split.train, [1, 2, 3]);
        assert_eq!(split.validation, [4, 5]);
        assert_eq!(split.absent, 2);
        assert_eq!(split.unused, 3); // 6, 7 (tstid) and 8

        let custom = SplitStrategy::Official {
            train: vec![SetName::Trnid, SetName::Valid],
            validate: vec![SetName::Tstid],
        };
        let split = split_images(imgs.clone(), &custom, Some(&sets)).unwrap();
        assert_eq!(split.train, [1, 2, 3, 4, 5]);
        assert_eq!(split.validation, [6, 7]);

        assert!(split_images(imgs.clone(), &SplitStrategy::official(), None).is_err());
        let overlapping = SplitStrategy::Official {
            train: vec![SetName::Valid],
            validate: vec![SetName::Valid],
        };
        assert!(split_images(imgs, &overlapping, Some(&sets)).is_err());
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let train: Vec<u32> = (1..=100).collect();
        let e0 = epoch_order(&train, 42, 0);
        assert_eq!(e0, epoch_order(&train, 42, 0));
        assert_ne!(e0, epoch_order(&train, 42, 1));
        assert_ne!(e0, epoch_order(&train, 43, 0));
        assert_ne!(e0, train);
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, train);
    }

    #[test]
    fn summary_counts_per_class() {
        let labels = Labels::from_vec(vec![1, 1, 2, 2, 2]);
        let split = Split {
            train: vec![1, 3, 4],
            validation: vec![2, 5],
            absent: 1,
            unused: 0,
        };
        let text = split.summary(&labels, None);
        assert!(
            text.starts_with("split: 3 train, 2 validation, 1 listed"),
            "{text}"
        );
        assert!(text.contains("\n    1      1    1  \n"), "{text}");
        assert!(text.contains("\n    2      2    1  \n"), "{text}");
    }
}
