//! Oxford 102 Flowers: streaming archive reader, MAT labels and split ids, train/validation splits.
//!
//! - [`ArchiveReader`]: the JPEG members of `102flowers.tgz` (or a `.tar`) in archive order,
//!   streamed, never extracted;
//! - [`Labels`], [`SetIds`] and [`ClassNames`]: `imagelabels.mat`, `setid.mat` and
//!   `cat_to_name.json`;
//! - [`split_images`] with a [`SplitStrategy`]: the train/validation [`Split`], and
//!   [`epoch_order`], each epoch's seeded training order;
//! - [`DatasetError`]: every error names the file it is about.
//!
//! With the `testing` feature, `matwriter` and `tarwriter` write small look-alike files for
//! tests.
//!
//! It reads files and knows nothing of images' pixels, the broker, the wire format or the
//! model: it must not depend on another crate of the workspace.

mod archive;
mod error;
mod mat;
#[cfg(feature = "testing")]
pub mod matwriter;
mod split;
#[cfg(feature = "testing")]
pub mod tarwriter;

pub use archive::{image_number, ArchiveImage, ArchiveReader};
pub use error::DatasetError;
pub use mat::{ClassNames, Labels, SetIds, SetName};
pub use split::{epoch_order, split_images, Split, SplitStrategy};
