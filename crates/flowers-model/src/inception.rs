//! InceptionV3 with torchvision's module names, in two variants and with trainable policies.
//!
//! The whole network is one file, longer than the others: its blocks are only built and run
//! together, and it reads top to bottom like torchvision's `inception.py`, which is how it is
//! checked.

use strum::VariantNames;
use tch::nn::{self, Init};
use tch::Tensor;

use crate::{ModelError, ParamGroup};

/// Which pretrained network the architecture reproduces; both share every parameter name/shape.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::EnumString, strum::Display, strum::VariantNames,
)]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = ModelError,
    parse_err_fn = unknown_variant
)]
pub enum Variant {
    /// torchvision's `Inception3`: average pools count the zero padding.
    Torchvision,
    /// TensorFlow's 2015 ImageNet graph (the FID InceptionV3): average pools exclude padding,
    /// and Mixed_7c's pool branch max-pools.
    Tf2015,
}

fn unknown_variant(value: &str) -> ModelError {
    ModelError::unknown_name("variant", value, Variant::VARIANTS)
}

/// Which parameters train. See the crate docs for the Keras mapping of `Reference`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::EnumString, strum::Display, strum::VariantNames,
)]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = ModelError,
    parse_err_fn = unknown_policy
)]
pub enum Policy {
    /// The Keras notebook: convolutions of the last 50 Keras layers, every BatchNorm's beta
    /// (all BatchNorms in training mode), and the head.
    Reference,
    /// Only `fc`; every BatchNorm frozen and in eval mode.
    Head,
    /// The reference convolutions ([`REFERENCE_TRAINABLE_CONVS`]) and `fc`; every BatchNorm
    /// frozen and in eval mode. Fine-tunes the top of the network on small data without
    /// replacing the pretrained running statistics by noisy batch statistics.
    Top,
    /// Everything, every BatchNorm in training mode.
    All,
}

fn unknown_policy(value: &str) -> ModelError {
    ModelError::unknown_name("policy", value, Policy::VARIANTS)
}

/// Convolutions that the Keras notebook's `base.layers[-50:]` contains (Keras `conv2d_76`,
/// `conv2d_83`, `conv2d_84` of mixed9 and `conv2d_85`..`conv2d_93` of mixed10).
pub const REFERENCE_TRAINABLE_CONVS: [&str; 12] = [
    "Mixed_7b.branch1x1",
    "Mixed_7b.branch3x3dbl_3b",
    "Mixed_7b.branch_pool",
    "Mixed_7c.branch1x1",
    "Mixed_7c.branch3x3_1",
    "Mixed_7c.branch3x3_2a",
    "Mixed_7c.branch3x3_2b",
    "Mixed_7c.branch3x3dbl_1",
    "Mixed_7c.branch3x3dbl_2",
    "Mixed_7c.branch3x3dbl_3a",
    "Mixed_7c.branch3x3dbl_3b",
    "Mixed_7c.branch_pool",
];

/// Whether the VarStore variable `name` belongs to [`InceptionV3::trunk`] (the stem and
/// `Mixed_5b` to `Mixed_7a`).
pub fn is_trunk_variable(name: &str) -> bool {
    const TRUNK_MODULES: [&str; 4] = ["Conv2d_", "Mixed_5", "Mixed_6", "Mixed_7a."];
    TRUNK_MODULES.iter().any(|m| name.starts_with(m))
}

/// Model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub num_classes: i64,
    pub variant: Variant,
    pub policy: Policy,
    /// Dropout before `fc` (torchvision: 0.5).
    pub dropout: f64,
    /// Running-stat momentum of BatchNorms in training mode, torch convention
    /// (new = (1 - m) * old + m * batch). Keras' default 0.99 is m = 0.01.
    pub bn_momentum: f64,
}

impl ModelConfig {
    pub fn new(num_classes: i64, variant: Variant, policy: Policy) -> Self {
        ModelConfig {
            num_classes,
            variant,
            policy,
            dropout: 0.5,
            bn_momentum: 0.1,
        }
    }
}

/// Both variants use eps 1e-3 (torchvision's BasicConv2d and TF's graph).
const BN_EPS: f64 = 1e-3;

#[derive(Debug, Clone, Copy)]
struct Trainability {
    conv: bool,
    bn_weight: bool,
    bn_bias: bool,
    /// BatchNorm uses batch statistics and updates its running stats when training.
    bn_train: bool,
}

impl Trainability {
    fn of(policy: Policy, layer: &str) -> Self {
        match policy {
            Policy::All => Trainability {
                conv: true,
                bn_weight: true,
                bn_bias: true,
                bn_train: true,
            },
            Policy::Head => Trainability {
                conv: false,
                bn_weight: false,
                bn_bias: false,
                bn_train: false,
            },
            Policy::Top => Trainability {
                conv: REFERENCE_TRAINABLE_CONVS.contains(&layer),
                bn_weight: false,
                bn_bias: false,
                bn_train: false,
            },
            // Keras' BatchNormalization(scale=False) has no gamma: only beta trains.
            Policy::Reference => Trainability {
                conv: REFERENCE_TRAINABLE_CONVS.contains(&layer),
                bn_weight: false,
                bn_bias: true,
                bn_train: true,
            },
        }
    }
}

/// Records which variables train and which running stats change, by full VarStore name.
#[derive(Debug, Default)]
struct Registry {
    trainable: Vec<(String, Tensor)>,
    bn_stats: Vec<(String, Tensor)>,
}

impl Registry {
    fn add(
        &mut self,
        p: &nn::Path<'_>,
        name: &str,
        dims: &[i64],
        init: Init,
        trainable: bool,
    ) -> Tensor {
        let t = p.add(name, nn::init(init, dims, p.device()), trainable);
        if trainable {
            self.trainable.push((p.path(name), t.shallow_clone()));
        }
        t
    }
}

/// torchvision's BasicConv2d: conv (no bias) + BatchNorm(eps 1e-3) + ReLU.
#[derive(Debug)]
struct BasicConv2d {
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
    bn_train: bool,
    bn_momentum: f64,
}

struct ConvSpec {
    c_in: i64,
    c_out: i64,
    kernel: [i64; 2],
    stride: i64,
    padding: [i64; 2],
}

fn conv(c_in: i64, c_out: i64, k: i64) -> ConvSpec {
    ConvSpec {
        c_in,
        c_out,
        kernel: [k, k],
        stride: 1,
        padding: [0, 0],
    }
}

impl ConvSpec {
    fn kernel(mut self, kh: i64, kw: i64) -> Self {
        self.kernel = [kh, kw];
        self
    }
    fn stride(mut self, s: i64) -> Self {
        self.stride = s;
        self
    }
    fn pad(mut self, ph: i64, pw: i64) -> Self {
        self.padding = [ph, pw];
        self
    }
}

/// What every layer constructor needs.
struct Builder<'a> {
    policy: Policy,
    bn_momentum: f64,
    registry: &'a mut Registry,
}

impl Builder<'_> {
    /// `name` is the torchvision module path, e.g. `Mixed_7c.branch_pool`.
    fn basic(&mut self, root: &nn::Path<'_>, name: &str, spec: ConvSpec) -> BasicConv2d {
        let tr = Trainability::of(self.policy, name);
        let p = name.split('.').fold(root.clone(), |p, part| p / part);
        let (pc, pb) = (&p / "conv", &p / "bn");
        // torchvision's init_weights: trunc_normal(std 0.1) for convs (cut at +-2, i.e. 20 sigma).
        let weight = self.registry.add(
            &pc,
            "weight",
            &[spec.c_out, spec.c_in, spec.kernel[0], spec.kernel[1]],
            Init::Randn {
                mean: 0.0,
                stdev: 0.1,
            },
            tr.conv,
        );
        let n = [spec.c_out];
        let bn_weight = self
            .registry
            .add(&pb, "weight", &n, Init::Const(1.0), tr.bn_weight);
        let bn_bias = self
            .registry
            .add(&pb, "bias", &n, Init::Const(0.0), tr.bn_bias);
        let running_mean = self
            .registry
            .add(&pb, "running_mean", &n, Init::Const(0.0), false);
        let running_var = self
            .registry
            .add(&pb, "running_var", &n, Init::Const(1.0), false);
        if tr.bn_train {
            for (stat, t) in [
                ("running_mean", &running_mean),
                ("running_var", &running_var),
            ] {
                self.registry
                    .bn_stats
                    .push((pb.path(stat), t.shallow_clone()));
            }
        }
        BasicConv2d {
            weight,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            stride: [spec.stride; 2],
            padding: spec.padding,
            bn_train: tr.bn_train,
            bn_momentum: self.bn_momentum,
        }
    }
}

impl BasicConv2d {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // ReLU in place, as torchvision's BasicConv2d: one activation-sized buffer less per
        // layer, which at 299 px is a fresh mmap (and its page faults) per step.
        x.conv2d(
            &self.weight,
            None::<Tensor>,
            self.stride,
            self.padding,
            [1, 1],
            1,
        )
        .batch_norm(
            Some(&self.bn_weight),
            Some(&self.bn_bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train && self.bn_train,
            self.bn_momentum,
            BN_EPS,
            true,
        )
        .relu_()
    }
}

/// The 3x3 stride-1 pool of a pool branch.
#[derive(Debug, Clone, Copy)]
enum PoolBranch {
    AvgIncludePad,
    AvgExcludePad,
    Max,
}

impl PoolBranch {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            PoolBranch::AvgIncludePad => x.avg_pool2d([3, 3], [1, 1], [1, 1], false, true, None),
            PoolBranch::AvgExcludePad => x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None),
            PoolBranch::Max => x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false),
        }
    }
}

fn max_pool_3x3_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

#[derive(Debug)]
struct InceptionA {
    b1x1: BasicConv2d,
    b5x5: [BasicConv2d; 2],
    b3x3dbl: [BasicConv2d; 3],
    pool: BasicConv2d,
    pool_kind: PoolBranch,
}

impl InceptionA {
    fn new(
        b: &mut Builder<'_>,
        root: &nn::Path<'_>,
        name: &str,
        c_in: i64,
        pool_features: i64,
        pool_kind: PoolBranch,
    ) -> Self {
        let n = |s: &str| format!("{name}.{s}");
        InceptionA {
            b1x1: b.basic(root, &n("branch1x1"), conv(c_in, 64, 1)),
            b5x5: [
                b.basic(root, &n("branch5x5_1"), conv(c_in, 48, 1)),
                b.basic(root, &n("branch5x5_2"), conv(48, 64, 5).pad(2, 2)),
            ],
            b3x3dbl: [
                b.basic(root, &n("branch3x3dbl_1"), conv(c_in, 64, 1)),
                b.basic(root, &n("branch3x3dbl_2"), conv(64, 96, 3).pad(1, 1)),
                b.basic(root, &n("branch3x3dbl_3"), conv(96, 96, 3).pad(1, 1)),
            ],
            pool: b.basic(root, &n("branch_pool"), conv(c_in, pool_features, 1)),
            pool_kind,
        }
    }

    fn forward(&self, x: &Tensor, t: bool) -> Tensor {
        Tensor::cat(
            &[
                self.b1x1.forward(x, t),
                chain(&self.b5x5, x, t),
                chain(&self.b3x3dbl, x, t),
                self.pool.forward(&self.pool_kind.apply(x), t),
            ],
            1,
        )
    }
}

fn chain(layers: &[BasicConv2d], x: &Tensor, t: bool) -> Tensor {
    layers
        .iter()
        .fold(x.shallow_clone(), |x, l| l.forward(&x, t))
}

/// Mixed_6a: grid reduction 35 -> 17.
#[derive(Debug)]
struct InceptionB {
    b3x3: BasicConv2d,
    b3x3dbl: [BasicConv2d; 3],
}

impl InceptionB {
    fn new(b: &mut Builder<'_>, root: &nn::Path<'_>, name: &str, c_in: i64) -> Self {
        let n = |s: &str| format!("{name}.{s}");
        InceptionB {
            b3x3: b.basic(root, &n("branch3x3"), conv(c_in, 384, 3).stride(2)),
            b3x3dbl: [
                b.basic(root, &n("branch3x3dbl_1"), conv(c_in, 64, 1)),
                b.basic(root, &n("branch3x3dbl_2"), conv(64, 96, 3).pad(1, 1)),
                b.basic(root, &n("branch3x3dbl_3"), conv(96, 96, 3).stride(2)),
            ],
        }
    }

    fn forward(&self, x: &Tensor, t: bool) -> Tensor {
        Tensor::cat(
            &[
                self.b3x3.forward(x, t),
                chain(&self.b3x3dbl, x, t),
                max_pool_3x3_s2(x),
            ],
            1,
        )
    }
}

/// Mixed_6b..6e: factorised 7x7 convolutions.
#[derive(Debug)]
struct InceptionC {
    b1x1: BasicConv2d,
    b7x7: [BasicConv2d; 3],
    b7x7dbl: [BasicConv2d; 5],
    pool: BasicConv2d,
    pool_kind: PoolBranch,
}

impl InceptionC {
    fn new(
        b: &mut Builder<'_>,
        root: &nn::Path<'_>,
        name: &str,
        c7: i64,
        pool_kind: PoolBranch,
    ) -> Self {
        let n = |s: &str| format!("{name}.{s}");
        let c_in = 768;
        InceptionC {
            b1x1: b.basic(root, &n("branch1x1"), conv(c_in, 192, 1)),
            b7x7: [
                b.basic(root, &n("branch7x7_1"), conv(c_in, c7, 1)),
                b.basic(
                    root,
                    &n("branch7x7_2"),
                    conv(c7, c7, 1).kernel(1, 7).pad(0, 3),
                ),
                b.basic(
                    root,
                    &n("branch7x7_3"),
                    conv(c7, 192, 1).kernel(7, 1).pad(3, 0),
                ),
            ],
            b7x7dbl: [
                b.basic(root, &n("branch7x7dbl_1"), conv(c_in, c7, 1)),
                b.basic(
                    root,
                    &n("branch7x7dbl_2"),
                    conv(c7, c7, 1).kernel(7, 1).pad(3, 0),
                ),
                b.basic(
                    root,
                    &n("branch7x7dbl_3"),
                    conv(c7, c7, 1).kernel(1, 7).pad(0, 3),
                ),
                b.basic(
                    root,
                    &n("branch7x7dbl_4"),
                    conv(c7, c7, 1).kernel(7, 1).pad(3, 0),
                ),
                b.basic(
                    root,
                    &n("branch7x7dbl_5"),
                    conv(c7, 192, 1).kernel(1, 7).pad(0, 3),
                ),
            ],
            pool: b.basic(root, &n("branch_pool"), conv(c_in, 192, 1)),
            pool_kind,
        }
    }

    fn forward(&self, x: &Tensor, t: bool) -> Tensor {
        Tensor::cat(
            &[
                self.b1x1.forward(x, t),
                chain(&self.b7x7, x, t),
                chain(&self.b7x7dbl, x, t),
                self.pool.forward(&self.pool_kind.apply(x), t),
            ],
            1,
        )
    }
}

/// Mixed_7a: grid reduction 17 -> 8.
#[derive(Debug)]
struct InceptionD {
    b3x3: [BasicConv2d; 2],
    b7x7x3: [BasicConv2d; 4],
}

impl InceptionD {
    fn new(b: &mut Builder<'_>, root: &nn::Path<'_>, name: &str, c_in: i64) -> Self {
        let n = |s: &str| format!("{name}.{s}");
        InceptionD {
            b3x3: [
                b.basic(root, &n("branch3x3_1"), conv(c_in, 192, 1)),
                b.basic(root, &n("branch3x3_2"), conv(192, 320, 3).stride(2)),
            ],
            b7x7x3: [
                b.basic(root, &n("branch7x7x3_1"), conv(c_in, 192, 1)),
                b.basic(
                    root,
                    &n("branch7x7x3_2"),
                    conv(192, 192, 1).kernel(1, 7).pad(0, 3),
                ),
                b.basic(
                    root,
                    &n("branch7x7x3_3"),
                    conv(192, 192, 1).kernel(7, 1).pad(3, 0),
                ),
                b.basic(root, &n("branch7x7x3_4"), conv(192, 192, 3).stride(2)),
            ],
        }
    }

    fn forward(&self, x: &Tensor, t: bool) -> Tensor {
        Tensor::cat(
            &[
                chain(&self.b3x3, x, t),
                chain(&self.b7x7x3, x, t),
                max_pool_3x3_s2(x),
            ],
            1,
        )
    }
}

/// Mixed_7b, Mixed_7c: expanded filter banks.
#[derive(Debug)]
struct InceptionE {
    b1x1: BasicConv2d,
    b3x3_1: BasicConv2d,
    b3x3_2a: BasicConv2d,
    b3x3_2b: BasicConv2d,
    b3x3dbl_1: BasicConv2d,
    b3x3dbl_2: BasicConv2d,
    b3x3dbl_3a: BasicConv2d,
    b3x3dbl_3b: BasicConv2d,
    pool: BasicConv2d,
    pool_kind: PoolBranch,
}

impl InceptionE {
    fn new(
        b: &mut Builder<'_>,
        root: &nn::Path<'_>,
        name: &str,
        c_in: i64,
        pool_kind: PoolBranch,
    ) -> Self {
        let n = |s: &str| format!("{name}.{s}");
        InceptionE {
            b1x1: b.basic(root, &n("branch1x1"), conv(c_in, 320, 1)),
            b3x3_1: b.basic(root, &n("branch3x3_1"), conv(c_in, 384, 1)),
            b3x3_2a: b.basic(
                root,
                &n("branch3x3_2a"),
                conv(384, 384, 1).kernel(1, 3).pad(0, 1),
            ),
            b3x3_2b: b.basic(
                root,
                &n("branch3x3_2b"),
                conv(384, 384, 1).kernel(3, 1).pad(1, 0),
            ),
            b3x3dbl_1: b.basic(root, &n("branch3x3dbl_1"), conv(c_in, 448, 1)),
            b3x3dbl_2: b.basic(root, &n("branch3x3dbl_2"), conv(448, 384, 3).pad(1, 1)),
            b3x3dbl_3a: b.basic(
                root,
                &n("branch3x3dbl_3a"),
                conv(384, 384, 1).kernel(1, 3).pad(0, 1),
            ),
            b3x3dbl_3b: b.basic(
                root,
                &n("branch3x3dbl_3b"),
                conv(384, 384, 1).kernel(3, 1).pad(1, 0),
            ),
            pool: b.basic(root, &n("branch_pool"), conv(c_in, 192, 1)),
            pool_kind,
        }
    }

    fn forward(&self, x: &Tensor, t: bool) -> Tensor {
        let a = self.b3x3_1.forward(x, t);
        let d = self.b3x3dbl_2.forward(&self.b3x3dbl_1.forward(x, t), t);
        Tensor::cat(
            &[
                self.b1x1.forward(x, t),
                self.b3x3_2a.forward(&a, t),
                self.b3x3_2b.forward(&a, t),
                self.b3x3dbl_3a.forward(&d, t),
                self.b3x3dbl_3b.forward(&d, t),
                self.pool.forward(&self.pool_kind.apply(x), t),
            ],
            1,
        )
    }
}

/// InceptionV3 with a new `num_classes` head. Input: float NCHW in [-1, 1] (see
/// [`crate::to_model_input`]), at least 75x75; 299x299 is the native size.
#[derive(Debug)]
pub struct InceptionV3 {
    config: ModelConfig,
    stem: [BasicConv2d; 5],
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7: [InceptionE; 2],
    fc_weight: Tensor,
    fc_bias: Tensor,
    trainable: Vec<(String, Tensor)>,
    bn_stats: Vec<(String, Tensor)>,
    head_names: [String; 2],
}

impl InceptionV3 {
    /// Creates the variables under `vs` (names like `Mixed_7c.branch1x1.conv.weight`, `fc.bias`),
    /// initialised like torchvision's `init_weights=True`; the head like a fresh `nn.Linear`.
    /// Frozen parameters are created with `requires_grad = false`.
    pub fn new(vs: &nn::Path<'_>, config: ModelConfig) -> Self {
        let mut registry = Registry::default();
        let mut b = Builder {
            policy: config.policy,
            bn_momentum: config.bn_momentum,
            registry: &mut registry,
        };
        let (avg, last) = match config.variant {
            Variant::Torchvision => (PoolBranch::AvgIncludePad, PoolBranch::AvgIncludePad),
            Variant::Tf2015 => (PoolBranch::AvgExcludePad, PoolBranch::Max),
        };
        let stem = [
            b.basic(vs, "Conv2d_1a_3x3", conv(3, 32, 3).stride(2)),
            b.basic(vs, "Conv2d_2a_3x3", conv(32, 32, 3)),
            b.basic(vs, "Conv2d_2b_3x3", conv(32, 64, 3).pad(1, 1)),
            b.basic(vs, "Conv2d_3b_1x1", conv(64, 80, 1)),
            b.basic(vs, "Conv2d_4a_3x3", conv(80, 192, 3)),
        ];
        let mixed_5 = [
            InceptionA::new(&mut b, vs, "Mixed_5b", 192, 32, avg),
            InceptionA::new(&mut b, vs, "Mixed_5c", 256, 64, avg),
            InceptionA::new(&mut b, vs, "Mixed_5d", 288, 64, avg),
        ];
        let mixed_6a = InceptionB::new(&mut b, vs, "Mixed_6a", 288);
        let mixed_6 = [
            InceptionC::new(&mut b, vs, "Mixed_6b", 128, avg),
            InceptionC::new(&mut b, vs, "Mixed_6c", 160, avg),
            InceptionC::new(&mut b, vs, "Mixed_6d", 160, avg),
            InceptionC::new(&mut b, vs, "Mixed_6e", 192, avg),
        ];
        let mixed_7a = InceptionD::new(&mut b, vs, "Mixed_7a", 768);
        let mixed_7 = [
            InceptionE::new(&mut b, vs, "Mixed_7b", 1280, avg),
            InceptionE::new(&mut b, vs, "Mixed_7c", 2048, last),
        ];
        // nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        let bound = 1.0 / (2048f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let fc = vs / "fc";
        let fc_weight = registry.add(&fc, "weight", &[config.num_classes, 2048], uniform, true);
        let fc_bias = registry.add(&fc, "bias", &[config.num_classes], uniform, true);
        InceptionV3 {
            config,
            stem,
            mixed_5,
            mixed_6a,
            mixed_6,
            mixed_7a,
            mixed_7,
            fc_weight,
            fc_bias,
            trainable: registry.trainable,
            bn_stats: registry.bn_stats,
            head_names: [fc.path("weight"), fc.path("bias")],
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The trunk: everything up to and including `Mixed_7a` (`[N, 1280, 8, 8]` at 299 px), i.e.
    /// all layers below the ones the `top` policy trains.
    pub fn trunk(&self, x: &Tensor, t: bool) -> Tensor {
        let x = self.stem[0].forward(x, t);
        let x = self.stem[1].forward(&x, t);
        let x = max_pool_3x3_s2(&self.stem[2].forward(&x, t));
        let x = self.stem[3].forward(&x, t);
        let mut x = max_pool_3x3_s2(&self.stem[4].forward(&x, t));
        for m in &self.mixed_5 {
            x = m.forward(&x, t);
        }
        x = self.mixed_6a.forward(&x, t);
        for m in &self.mixed_6 {
            x = m.forward(&x, t);
        }
        self.mixed_7a.forward(&x, t)
    }

    /// Whether the trunk is fixed under this policy: no trainable parameter and no BatchNorm in
    /// training mode, so [`InceptionV3::trunk`] of an image only changes when its variables are
    /// overwritten ([`is_trunk_variable`]), and can be cached.
    pub fn trunk_is_frozen(&self) -> bool {
        matches!(self.config.policy, Policy::Head | Policy::Top)
    }

    fn pooled_from_trunk(&self, h: &Tensor, t: bool) -> Tensor {
        let mut x = self.mixed_7[0].forward(h, t);
        x = self.mixed_7[1].forward(&x, t);
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    /// Logits from a trunk output: `forward_t(x, train)` is `forward_from_trunk(trunk(x, train), train)`.
    pub fn forward_from_trunk(&self, h: &Tensor, train: bool) -> Tensor {
        self.pooled_from_trunk(h, train)
            .dropout(self.config.dropout, train)
            .linear(&self.fc_weight, Some(&self.fc_bias))
    }

    /// Logits `[N, num_classes]`. `train` enables dropout and batch statistics in the BatchNorms
    /// the policy trains; frozen BatchNorms always use their running stats (Keras semantics).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_from_trunk(&self.trunk(x, train), train)
    }

    /// The 2048-d average-pooled features (before dropout and `fc`), in eval mode.
    pub fn features(&self, x: &Tensor) -> Tensor {
        self.pooled_from_trunk(&self.trunk(x, false), false)
    }

    /// Trainable parameters by full VarStore name, in model order.
    pub fn trainable_parameters(&self) -> &[(String, Tensor)] {
        &self.trainable
    }

    /// Optimizer groups: `backbone` (trainable non-head parameters, lr * `backbone_lr_scale`)
    /// and `head` (`fc`, lr * 1); an empty group is left out.
    pub fn param_groups(&self, backbone_lr_scale: f64) -> Vec<ParamGroup> {
        let (head, backbone): (Vec<_>, Vec<_>) = self
            .trainable
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .partition(|(n, _)| self.head_names.contains(n));
        [
            ("backbone", backbone_lr_scale, backbone),
            ("head", 1.0, head),
        ]
        .into_iter()
        .filter(|(_, _, p)| !p.is_empty())
        .map(|(name, scale, params)| ParamGroup::new(name, scale, &params))
        .collect()
    }

    pub fn trainable_names(&self) -> Vec<String> {
        self.trainable.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Running stats (`running_mean`, `running_var`) of the BatchNorms that train.
    pub fn trained_bn_stats(&self) -> &[(String, Tensor)] {
        &self.bn_stats
    }

    /// What a sync between workers must exchange: trainable parameters, then the running stats
    /// of the BatchNorms that train. Everything else stays at its loaded value.
    pub fn sync_tensors(&self) -> Vec<(String, Tensor)> {
        self.trainable
            .iter()
            .chain(&self.bn_stats)
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    pub fn sync_tensor_names(&self) -> Vec<String> {
        self.trainable
            .iter()
            .chain(&self.bn_stats)
            .map(|(n, _)| n.clone())
            .collect()
    }
}
