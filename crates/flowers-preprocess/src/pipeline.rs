//! The decoding pipeline: one thread streams the archive; JPEG bytes reach a rayon pool of the
//! other `threads - 1` workers through a bounded channel, so memory stays bounded whatever the
//! archive size (the pixels go to a sink, e.g. the [`PixelStore`] file; only an index is kept in
//! memory).

use std::path::Path;
use std::sync::mpsc::{sync_channel, TrySendError};
use std::time::{Duration, Instant};

use flowers_dataset::{ArchiveImage, ArchiveReader, Labels};
use flowers_imaging::JpegPreprocessor;
use rayon::iter::{ParallelBridge, ParallelIterator};

use crate::store::{image_bytes, PixelStore};
use crate::PreprocessError;

/// How to preprocess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreprocessOptions {
    /// Side of the square output images.
    pub img_size: u32,
    /// Threads in all, the one reading the archive included (it decodes too); 0 means one per
    /// available core.
    pub threads: usize,
    /// Only the first `limit` images of the archive.
    pub limit: Option<usize>,
    /// Only images of the first `classes` classes (labels 1..=classes); the others are not
    /// decoded. For small runs and tests on a subset of the data set.
    pub classes: Option<u32>,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        Self {
            img_size: 299,
            threads: 0,
            limit: None,
            classes: None,
        }
    }
}

/// An image that was decoded into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub number: u32,
    pub file_name: String,
    /// 0-based class.
    pub label: u32,
}

/// An archive member that could not be decoded (logged, counted, left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file_name: String,
    pub reason: String,
}

/// The result of [`preprocess_archive`].
#[derive(Debug)]
pub struct Preprocessed {
    /// Decoded images, by ascending number.
    pub images: Vec<ImageInfo>,
    /// Members that could not be decoded.
    pub skipped: Vec<Skipped>,
    pub store: PixelStore,
    pub elapsed: Duration,
}

/// Decodes every JPEG of `archive` (`.tgz` or `.tar`) into a [`PixelStore`] under `cache_dir`
/// (which should be on disk, not tmpfs: the store is `images * image_bytes` large).
///
/// Undecodable JPEGs are skipped and reported; a broken or missing archive, an image without a
/// label, or a store I/O failure ends with an error naming the file.
pub fn preprocess_archive(
    archive: &Path,
    labels: &Labels,
    opts: &PreprocessOptions,
    cache_dir: &Path,
) -> Result<Preprocessed, PreprocessError> {
    let start = Instant::now();
    let mut store = PixelStore::create(cache_dir, opts.img_size)?;
    let outcome = run_pipeline(archive, labels, opts, |slot, pixels| {
        store.write(slot, pixels)
    })?;
    store.index(
        outcome
            .decoded
            .iter()
            .map(|(slot, info)| (info.number, *slot)),
    );
    let mut images: Vec<ImageInfo> = outcome.decoded.into_iter().map(|(_, i)| i).collect();
    images.sort_unstable_by_key(|i| i.number);
    let elapsed = start.elapsed();
    tracing::info!(
        archive = %archive.display(),
        images = images.len(),
        skipped = outcome.skipped.len(),
        ignored_members = outcome.ignored,
        img_size = opts.img_size,
        seconds = elapsed.as_secs_f64(),
        "preprocessed archive"
    );
    Ok(Preprocessed {
        images,
        skipped: outcome.skipped,
        store,
        elapsed,
    })
}

/// What the pipeline did with an archive.
pub struct PipelineOutcome {
    /// (store slot = position among the archive's images, image).
    pub decoded: Vec<(u64, ImageInfo)>,
    pub skipped: Vec<Skipped>,
    /// Archive members that are not images.
    pub ignored: usize,
}

enum JobResult {
    Decoded(u64, ImageInfo),
    Skipped(Skipped),
}

/// One JPEG of the archive, on its way to a decoder.
type Job = (u64, u32, ArchiveImage);

/// A decoder with its output buffer: one per decoding thread.
struct Decoder {
    jpeg: JpegPreprocessor,
    pixels: Vec<u8>,
}

impl Decoder {
    fn new(img_size: u32) -> Result<Self, PreprocessError> {
        Ok(Self {
            jpeg: JpegPreprocessor::new().map_err(|e| PreprocessError::Startup(e.to_string()))?,
            pixels: vec![0u8; image_bytes(img_size)],
        })
    }

    /// Decodes one image into the sink; an undecodable JPEG is skipped, not an error.
    fn run<F>(
        &mut self,
        (slot, label, image): Job,
        img_size: u32,
        sink: &F,
    ) -> Result<JobResult, PreprocessError>
    where
        F: Fn(u64, &[u8]) -> Result<(), PreprocessError>,
    {
        match self
            .jpeg
            .preprocess_into(&image.bytes, img_size, &mut self.pixels)
        {
            Ok(()) => {
                sink(slot, &self.pixels)?;
                Ok(JobResult::Decoded(
                    slot,
                    ImageInfo {
                        number: image.number,
                        file_name: image.name,
                        label,
                    },
                ))
            }
            Err(e) => {
                tracing::warn!(file = %image.name, error = %e, "skipping image");
                Ok(JobResult::Skipped(Skipped {
                    file_name: image.name,
                    reason: e.to_string(),
                }))
            }
        }
    }
}

/// Streams `archive` and decodes its images on `opts.threads` threads in all, handing each
/// image's pixels and slot to `sink`. Shared by [`preprocess_archive`] and the loader's
/// benchmark.
///
/// The thread that streams the archive counts among them: it hands JPEGs to the other
/// `threads - 1` through a bounded queue and decodes one itself whenever the queue is full, so
/// that `--threads N` keeps N cores busy (gunzip alone takes a fifth of one) and one thread
/// reads and decodes in turn.
pub fn run_pipeline<F>(
    archive: &Path,
    labels: &Labels,
    opts: &PreprocessOptions,
    sink: F,
) -> Result<PipelineOutcome, PreprocessError>
where
    F: Fn(u64, &[u8]) -> Result<(), PreprocessError> + Sync,
{
    if opts.img_size == 0 {
        return Err(PreprocessError::Options("img_size must be positive".into()));
    }
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = threads - 1;
    let img_size = opts.img_size;
    // A few JPEGs (~100 kB each) per worker keep them busy without holding the archive in memory.
    let (tx, rx) = sync_channel::<Job>(workers * 4);
    // Without workers the reader decodes everything itself.
    let tx = (workers > 0).then_some(tx);
    let sink = &sink;

    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("archive-reader".into())
            .spawn_scoped(
                scope,
                move || -> Result<(usize, Vec<JobResult>), PreprocessError> {
                    let mut decoder = Decoder::new(img_size)?;
                    let mut own = Vec::new();
                    let mut reader = ArchiveReader::open(archive)?;
                    let mut slot = 0usize;
                    for image in reader.images()? {
                        if opts.limit.is_some_and(|limit| slot >= limit) {
                            break;
                        }
                        let image = image?;
                        let label = labels.label_of(image.number).ok_or_else(|| {
                            PreprocessError::MissingLabel {
                                archive: archive.to_path_buf(),
                                file_name: image.name.clone(),
                                number: image.number,
                                labelled: labels.len(),
                            }
                        })?;
                        if opts.classes.is_some_and(|classes| label >= classes) {
                            continue;
                        }
                        let job = (slot as u64, label, image);
                        slot += 1;
                        let sent = match &tx {
                            Some(tx) => tx.try_send(job),
                            None => Err(TrySendError::Full(job)),
                        };
                        match sent {
                            Ok(()) => {}
                            // The workers are busy (or there are none): decode this one here.
                            Err(TrySendError::Full(job)) => {
                                own.push(decoder.run(job, img_size, sink)?)
                            }
                            // The workers stopped on an error of their own, reported by them.
                            Err(TrySendError::Disconnected(_)) => break,
                        }
                    }
                    Ok((reader.ignored(), own))
                },
            )
            .map_err(|e| PreprocessError::Startup(e.to_string()))?;

        let results: Result<Vec<JobResult>, PreprocessError> = if workers == 0 {
            Ok(Vec::new())
        } else {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(workers)
                .thread_name(|i| format!("decode-{i}"))
                .build()
                .map_err(|e| PreprocessError::Startup(e.to_string()))?;
            pool.install(|| {
                rx.into_iter()
                    .par_bridge()
                    .map_init(
                        || Decoder::new(img_size),
                        |decoder, job| {
                            decoder
                                .as_mut()
                                .map_err(|e| PreprocessError::Startup(e.to_string()))?
                                .run(job, img_size, sink)
                        },
                    )
                    .collect()
            })
        };
        // The reader's error (truncated archive, missing label) explains an early end best.
        let (ignored, own) = reader
            .join()
            .map_err(|_| PreprocessError::Startup("archive reader thread panicked".into()))??;
        let mut outcome = PipelineOutcome {
            decoded: Vec::new(),
            skipped: Vec::new(),
            ignored,
        };
        for result in results?.into_iter().chain(own) {
            match result {
                JobResult::Decoded(slot, info) => outcome.decoded.push((slot, info)),
                JobResult::Skipped(skipped) => outcome.skipped.push(skipped),
            }
        }
        Ok(outcome)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowers_dataset::tarwriter::write_archive;
    use flowers_imaging::{encode_rgb_jpeg, preprocess_jpeg};

    /// A JPEG whose colour encodes `number`, so store round trips can be checked.
    fn jpeg_for(number: u32, width: usize, height: usize) -> Vec<u8> {
        let colour = [
            (number * 40 % 256) as u8,
            100,
            (255 - number * 20 % 256) as u8,
        ];
        let rgb: Vec<u8> = colour
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        encode_rgb_jpeg(&rgb, width, height, 90).unwrap()
    }

    fn opts(img_size: u32, threads: usize) -> PreprocessOptions {
        PreprocessOptions {
            img_size,
            threads,
            limit: None,
            classes: None,
        }
    }

    #[test]
    fn preprocesses_a_small_archive_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("flowers.tgz");
        let jpegs: Vec<(String, Vec<u8>)> = [5u32, 2, 9, 3]
            .iter()
            .map(|&n| {
                (
                    format!("jpg/image_{n:05}.jpg"),
                    jpeg_for(n, 60 + n as usize, 48),
                )
            })
            .collect();
        let mut members: Vec<(&str, &[u8])> = jpegs
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        members.push(("jpg/image_00007.jpg", b"this is not a jpeg"));
        members.push(("README", b"ignored"));
        write_archive(&archive, &members, true).unwrap();
        let labels = Labels::from_vec((1..=10).map(|n| n % 3 + 1).collect());

        let cache = dir.path().join("cache");
        let out = preprocess_archive(&archive, &labels, &opts(32, 2), &cache).unwrap();
        assert_eq!(
            out.images.iter().map(|i| i.number).collect::<Vec<_>>(),
            [2, 3, 5, 9]
        );
        for info in &out.images {
            assert_eq!(info.label, info.number % 3);
            assert_eq!(info.file_name, format!("jpg/image_{:05}.jpg", info.number));
        }
        assert_eq!(out.skipped.len(), 1);
        assert_eq!(out.skipped[0].file_name, "jpg/image_00007.jpg");
        assert!(out.skipped[0].reason.contains("JPEG"), "{:?}", out.skipped);

        let store = &out.store;
        assert_eq!(
            (store.img_size(), store.image_bytes(), store.len()),
            (32, 3072, 4)
        );
        let mut buf = vec![0u8; store.image_bytes()];
        for (name, bytes) in &jpegs {
            let number = flowers_dataset::image_number(name).unwrap();
            store.copy_into(number, &mut buf).unwrap();
            assert_eq!(buf, preprocess_jpeg(bytes, 32).unwrap(), "{name}");
        }
        assert!(matches!(
            store.copy_into(7, &mut buf),
            Err(PreprocessError::NotStored { number: 7 })
        ));
        assert!(matches!(
            store.copy_into(2, &mut buf[..10]),
            Err(PreprocessError::BufferSize { .. })
        ));
        // The store file is unlinked: nothing is left in the cache directory.
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);

        let limited = PreprocessOptions {
            limit: Some(2),
            ..opts(32, 1)
        };
        let out = preprocess_archive(&archive, &labels, &limited, &cache).unwrap();
        assert_eq!(
            out.images.iter().map(|i| i.number).collect::<Vec<_>>(),
            [2, 5],
            "the first two images in archive order"
        );

        let first_class = PreprocessOptions {
            classes: Some(1),
            ..opts(32, 1)
        };
        let out = preprocess_archive(&archive, &labels, &first_class, &cache).unwrap();
        assert_eq!(
            out.images.iter().map(|i| i.number).collect::<Vec<_>>(),
            [3, 9],
            "only label 1 (0-based 0); the corrupt image of label 2 is not even decoded"
        );
        assert!(out.skipped.is_empty());
        assert_eq!(out.store.len(), 2);
    }

    #[test]
    fn images_without_labels_and_broken_archives_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let jpeg = jpeg_for(1, 40, 40);
        let archive = dir.path().join("few.tar");
        write_archive(
            &archive,
            &[
                ("jpg/image_00001.jpg", &jpeg),
                ("jpg/image_00012.jpg", &jpeg),
            ],
            false,
        )
        .unwrap();
        let labels = Labels::from_vec(vec![1; 10]);
        let err = preprocess_archive(&archive, &labels, &opts(16, 2), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("few.tar")
                && err.contains("jpg/image_00012.jpg")
                && err.contains("no label"),
            "{err}"
        );

        let bytes = std::fs::read(&archive).unwrap();
        let cut = dir.path().join("cut.tar");
        std::fs::write(&cut, &bytes[..bytes.len() - 1500]).unwrap();
        let err = preprocess_archive(&cut, &labels, &opts(16, 2), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cut.tar") && err.contains("truncated"),
            "{err}"
        );

        let missing = dir.path().join("missing.tgz");
        let err = preprocess_archive(&missing, &labels, &opts(16, 1), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.tgz"), "{err}");
    }
}
