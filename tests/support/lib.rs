//! Helpers for the end-to-end tests: broker URL, unique run ids, a cuttable
//! TCP proxy in front of RabbitMQ, synthetic batches and small data sets, a run of the real
//! services on this host ([`local`]) and a RabbitMQ node of a test's own ([`rabbit`]).

pub mod local;
pub mod rabbit;

use flowers_dataset::matwriter::{write_mat, MatVar};
use flowers_dataset::tarwriter::write_archive;
use flowers_wire::{build_batch, Batch, BatchHeader, Split};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The broker under test: the one the services find without `--broker-url`.
pub use flowers_broker::broker_url_from_env as broker_url;

/// The `loader` binary of this workspace (see [`workspace_binary`]).
pub fn loader_binary() -> PathBuf {
    workspace_binary("loader")
}

/// The binary of the workspace package `package` (each service package has one binary of its
/// own name), with every workspace binary built or brought up to date on first use, so the
/// tests never run a stale one. All of them at once, as `just test` builds them: building one
/// package alone would unify dependency features differently and rebuild half the tree.
pub fn workspace_binary(package: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--workspace", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(package);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// A run id no other test (or test process) uses: `<prefix>-<pid>-<time>-<n>`.
pub fn unique_run_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A valid batch of `n` `size` x `size` images whose pixels encode `(index, image, byte)`.
pub fn synthetic_batch(
    run_id: &str,
    epoch: u32,
    split: Split,
    index: u32,
    of: u32,
    n: usize,
    size: u32,
) -> Batch {
    let image_bytes = (size * size * 3) as usize;
    let pixels = (0..n * image_bytes)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(index * 7) as u8)
        .collect();
    let header = BatchHeader {
        run_id: run_id.to_string(),
        epoch,
        split,
        batch_index: index,
        batches_in_epoch: of,
        num_classes: 10,
        eval_part: 0,
    };
    let names = (0..n)
        .map(|i| format!("jpg/image_{:05}.jpg", index as usize * n + i + 1))
        .collect();
    let labels = (0..n).map(|i| (i % 10) as u32).collect();
    build_batch(&header, size, size, names, labels, pixels).expect("synthetic batch is valid")
}

/// A TCP proxy to RabbitMQ that a test can cut (dropping every connection
/// and refusing new ones) and restore, to exercise reconnection.
pub struct TcpProxy {
    port: u16,
    down: Arc<AtomicBool>,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts proxying a local port to `target` (`host:port`).
    pub async fn start(target: &str) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(AtomicBool::new(false));
        let relays: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = target.to_string();
        let acceptor = {
            let (down, relays) = (down.clone(), relays.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        continue; // dropping `client` refuses it
                    }
                    let target = target.clone();
                    let relay = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    relays.lock().unwrap().push(relay);
                }
            })
        };
        Ok(TcpProxy {
            port,
            down,
            relays,
            acceptor,
        })
    }

    /// `url` (a broker URL) with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
        let (auth, hostpath) = match rest.rsplit_once('@') {
            Some((auth, hp)) => (format!("{auth}@"), hp),
            None => (String::new(), rest),
        };
        let path = hostpath.find('/').map(|i| &hostpath[i..]).unwrap_or("");
        format!("{scheme}://{auth}127.0.0.1:{}{path}", self.port)
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

/// A small generated data set on disk, shaped like the real one.
pub struct SmallDataset {
    pub dir: tempfile::TempDir,
    /// `jpg/image_NNNNN.jpg` members in a `.tgz`.
    pub archive: PathBuf,
    /// `imagelabels.mat` look-alike with a label (1-based) for every image number.
    pub labels: PathBuf,
    /// (image number, 0-based label) of every decodable image.
    pub images: Vec<(u32, u32)>,
    /// Member names of the corrupt JPEGs.
    pub corrupt: Vec<String>,
}

impl SmallDataset {
    /// `n` JPEGs of varied sizes in `classes` classes, plus corrupt members
    /// for the image numbers in `corrupt` (numbers after the good ones).
    pub fn generate(n: u32, classes: u32, corrupt: &[u32]) -> SmallDataset {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        let mut images = Vec::new();
        for number in 1..=n {
            let (w, h) = (24 + (number * 7) % 40, 20 + (number * 11) % 36);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 9 + number) as u8,
                    (y * 5 + number * 3) as u8,
                    ((x + y) * 3) as u8,
                ])
            });
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                .encode_image(&img)
                .expect("encode JPEG");
            members.push((format!("jpg/image_{number:05}.jpg"), jpeg));
            images.push((number, (number - 1) % classes));
        }
        let mut corrupt_names = Vec::new();
        for &number in corrupt {
            let name = format!("jpg/image_{number:05}.jpg");
            // A JPEG start-of-image marker followed by garbage.
            members.push((
                name.clone(),
                [&[0xFF, 0xD8, 0xFF][..], b"not really a jpeg"].concat(),
            ));
            corrupt_names.push(name);
        }
        let archive = dir.path().join("102flowers.tgz");
        let refs: Vec<(&str, &[u8])> = members
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        write_archive(&archive, &refs, true).expect("write archive");
        let total = n.max(corrupt.iter().copied().max().unwrap_or(0));
        let labels_data: Vec<f64> = (1..=total)
            .map(|number| ((number - 1) % classes + 1) as f64)
            .collect();
        let labels = dir.path().join("imagelabels.mat");
        write_mat(&labels, &[MatVar::row("labels", &labels_data)]).expect("write labels");
        SmallDataset {
            dir,
            archive,
            labels,
            images,
            corrupt: corrupt_names,
        }
    }
}

/// A service process started by a test; killed (SIGKILL) when dropped, so a failing
/// test leaves nothing running. Its stdout and stderr go to `log`.
pub struct Service {
    pub name: String,
    pub log: PathBuf,
    child: std::process::Child,
}

impl Service {
    pub fn spawn(name: &str, mut command: Command, log_dir: &std::path::Path) -> Service {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Service {
            name: name.to_string(),
            log,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.child.wait().expect("wait for the service")
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("poll the service")
    }

    /// The last lines of its log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The checkout this test crate belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The shared data set: `$FLOWERS_DIR`, else `../shared/flowers` beside the checkout.
pub fn flowers_dir() -> PathBuf {
    let dir = std::env::var_os("FLOWERS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/flowers"));
    assert!(
        dir.join("imagelabels.mat").exists(),
        "no imagelabels.mat in {}: set FLOWERS_DIR to the Oxford 102 Flowers folder",
        dir.display()
    );
    dir
}

/// The image archive of the data folder: its first `102flowers*.tgz` or `.tar`.
pub fn archive_in(dir: &Path) -> PathBuf {
    let mut archives: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read FLOWERS_DIR")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("102flowers") && (name.ends_with(".tgz") || name.ends_with(".tar"))
        })
        .collect();
    archives.sort();
    archives
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no 102flowers*.tgz or .tar in {}", dir.display()))
}

/// The converted pretrained InceptionV3 (`just weights`).
pub fn pretrained_weights() -> PathBuf {
    let weights = workspace_root().join("weights/inception_v3_tf2015.safetensors");
    assert!(
        weights.exists(),
        "{} is missing: run `just weights`",
        weights.display()
    );
    weights
}

/// What every run must end with, whatever happened on the way: finished, `epochs` epochs, each
/// with every training batch counted once and every validation batch evaluated, and a best
/// checkpoint.
pub fn assert_every_epoch_complete(status: &flowers_proto::v1::RunStatus, epochs: u32) {
    use flowers_proto::v1::RunState;
    assert_eq!(status.state, RunState::Finished as i32, "{status:?}");
    assert_eq!(status.epochs.len(), epochs as usize, "{status:?}");
    for epoch in &status.epochs {
        assert!(epoch.train_batches_total > 0, "{epoch:?}");
        assert_eq!(
            epoch.train_batches_done, epoch.train_batches_total,
            "every training batch counted once: {epoch:?}"
        );
        assert!(epoch.trained && epoch.validated, "{epoch:?}");
        assert_eq!(epoch.val_batches_done, epoch.val_batches_total, "{epoch:?}");
    }
    assert!(status.best.is_some(), "a best checkpoint: {status:?}");
}
