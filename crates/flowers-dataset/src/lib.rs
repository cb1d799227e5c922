//! Oxford 102 Flowers: streaming archive reader, MAT labels and split ids, train/validation splits.
