//! Optimizers over named tensors, with per-group learning-rate multipliers and checkpointable
//! state. Update rules follow `torch.optim` (single-tensor path) exactly.

use std::collections::BTreeMap;
use std::str::FromStr;

use strum::VariantNames;
use tch::Tensor;

use crate::ModelError;

/// Update rule and its hyper-parameters (torch defaults via the constructors). Its name (as
/// shown, parsed and saved in checkpoints) is the lowercase variant name: `adamax`, `adam`,
/// `sgd`.
#[derive(
    Debug, Clone, Copy, PartialEq, strum::Display, strum::IntoStaticStr, strum::EnumDiscriminants,
)]
#[strum(serialize_all = "lowercase")]
#[strum_discriminants(
    name(OptimizerName),
    derive(strum::EnumString, strum::VariantNames),
    strum(
        serialize_all = "lowercase",
        parse_err_ty = ModelError,
        parse_err_fn = unknown_optimizer
    )
)]
pub enum OptimizerKind {
    /// `torch.optim.Adamax`.
    Adamax {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// `torch.optim.Adam` (L2 weight decay added to the gradient, not AdamW).
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// `torch.optim.SGD`.
    Sgd {
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
    },
}

impl OptimizerKind {
    pub fn adamax() -> Self {
        OptimizerKind::Adamax {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
    pub fn adam() -> Self {
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
    pub fn sgd(momentum: f64) -> Self {
        OptimizerKind::Sgd {
            momentum,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    /// Same rule with another L2 weight decay.
    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        match &mut self {
            OptimizerKind::Adamax { weight_decay, .. }
            | OptimizerKind::Adam { weight_decay, .. }
            | OptimizerKind::Sgd { weight_decay, .. } => *weight_decay = wd,
        }
        self
    }

    pub fn name(&self) -> &'static str {
        self.into()
    }

    fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerKind::Adamax { weight_decay, .. }
            | OptimizerKind::Adam { weight_decay, .. }
            | OptimizerKind::Sgd { weight_decay, .. } => weight_decay,
        }
    }

    /// Names of the per-parameter state buffers, as in torch's `optimizer.state`.
    fn buffer_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Adamax { .. } => &["exp_avg", "exp_inf"],
            OptimizerKind::Adam { .. } => &["exp_avg", "exp_avg_sq"],
            OptimizerKind::Sgd { momentum, .. } if *momentum != 0.0 => &["momentum_buffer"],
            OptimizerKind::Sgd { .. } => &[],
        }
    }
}

fn unknown_optimizer(value: &str) -> ModelError {
    ModelError::unknown_name("optimizer", value, OptimizerName::VARIANTS)
}

/// Parses `adamax`, `adam` or `sgd` (momentum 0.9) with torch's other defaults.
impl FromStr for OptimizerKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Ok(match s.parse::<OptimizerName>()? {
            OptimizerName::Adamax => OptimizerKind::adamax(),
            OptimizerName::Adam => OptimizerKind::adam(),
            OptimizerName::Sgd => OptimizerKind::sgd(0.9),
        })
    }
}

/// Parameters that share a learning-rate multiplier (e.g. pretrained backbone vs new head).
#[derive(Debug)]
pub struct ParamGroup {
    pub name: String,
    /// The group's lr is `lr * lr_scale`.
    pub lr_scale: f64,
    pub params: Vec<(String, Tensor)>,
}

impl ParamGroup {
    pub fn new(name: impl Into<String>, lr_scale: f64, params: &[(String, Tensor)]) -> Self {
        ParamGroup {
            name: name.into(),
            lr_scale,
            params: params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
struct ParamState {
    step: i64,
    /// In the order of [`OptimizerKind::buffer_names`]; empty until the first step.
    buffers: Vec<Tensor>,
}

/// An optimizer over parameter groups. Parameters without a gradient are skipped (as in torch).
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    groups: Vec<ParamGroup>,
    state: Vec<Vec<ParamState>>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, groups: Vec<ParamGroup>) -> Self {
        let state = groups
            .iter()
            .map(|g| g.params.iter().map(|_| ParamState::default()).collect())
            .collect();
        Optimizer {
            kind,
            groups,
            state,
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for (_, p) in &mut g.params {
                p.zero_grad();
            }
        }
    }

    /// One update with base learning rate `lr` (each group uses `lr * lr_scale`).
    pub fn step(&mut self, lr: f64) {
        let kind = self.kind;
        tch::no_grad(|| {
            for (group, states) in self.groups.iter_mut().zip(&mut self.state) {
                let lr = lr * group.lr_scale;
                for ((_, param), state) in group.params.iter_mut().zip(states) {
                    let grad = param.grad();
                    if grad.defined() {
                        update(kind, lr, param, &grad, state);
                    }
                }
            }
        });
    }

    /// State tensors named `<param>.step` (int64 scalar) and `<param>.<buffer>` for parameters
    /// that have been stepped.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let names = self.kind.buffer_names();
        let mut out = Vec::new();
        for (group, states) in self.groups.iter().zip(&self.state) {
            for ((pname, _), st) in group.params.iter().zip(states) {
                if st.step == 0 {
                    continue;
                }
                out.push((format!("{pname}.step"), Tensor::from(st.step)));
                for (b, t) in names.iter().zip(&st.buffers) {
                    out.push((format!("{pname}.{b}"), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores state written by [`Optimizer::state_tensors`]; `what` names the source in errors.
    /// Parameters absent from `tensors` start fresh (they had not been stepped).
    pub fn load_state_tensors(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        what: &str,
    ) -> Result<(), ModelError> {
        let names = self.kind.buffer_names();
        for (group, states) in self.groups.iter().zip(&mut self.state) {
            for ((pname, param), st) in group.params.iter().zip(states) {
                let Some(step) = tensors.get(&format!("{pname}.step")) else {
                    *st = ParamState::default();
                    continue;
                };
                let step = step.f_int64_value(&[])?;
                let mut buffers = Vec::with_capacity(names.len());
                for b in names {
                    let key = format!("{pname}.{b}");
                    let Some(t) = tensors.get(&key) else {
                        return Err(ModelError::MissingOptimizerState {
                            what: what.to_owned(),
                            key,
                            kind: self.kind,
                        });
                    };
                    if t.size() != param.size() {
                        return Err(ModelError::OptimizerStateShape {
                            what: what.to_owned(),
                            key,
                            state: t.size(),
                            param: param.size(),
                        });
                    }
                    buffers.push(t.to_device(param.device()).to_kind(param.kind()));
                }
                *st = ParamState { step, buffers };
            }
        }
        Ok(())
    }
}

fn update(kind: OptimizerKind, lr: f64, param: &mut Tensor, grad: &Tensor, st: &mut ParamState) {
    st.step += 1;
    let step = st.step as f64;
    let wd = kind.weight_decay();
    let grad = if wd != 0.0 {
        grad + &*param * wd
    } else {
        grad.shallow_clone()
    };
    match kind {
        OptimizerKind::Adamax {
            beta1, beta2, eps, ..
        } => {
            let (exp_avg, exp_inf) = moments(&mut st.buffers, param);
            let _ = exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = exp_inf.g_mul_scalar_(beta2);
            let mut abs_eps = grad.abs();
            let _ = abs_eps.g_add_scalar_(eps);
            let _ = exp_inf.maximum_out(exp_inf, &abs_eps);
            let clr = lr / (1.0 - beta1.powf(step));
            // addcdiv_(exp_avg, exp_inf, value=-clr) evaluates (value * t1) / t2.
            let mut update = exp_avg.g_mul_scalar(-clr);
            update /= &*exp_inf;
            *param += update;
        }
        OptimizerKind::Adam {
            beta1, beta2, eps, ..
        } => {
            let (exp_avg, exp_avg_sq) = moments(&mut st.buffers, param);
            let _ = exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = exp_avg_sq.g_mul_scalar_(beta2);
            *exp_avg_sq += grad.g_mul_scalar(1.0 - beta2) * &grad;
            let bc1 = 1.0 - beta1.powf(step);
            let bc2_sqrt = (1.0 - beta2.powf(step)).sqrt();
            let denom = exp_avg_sq.sqrt() / bc2_sqrt + eps;
            *param += exp_avg.g_mul_scalar(-lr / bc1) / denom;
        }
        OptimizerKind::Sgd {
            momentum,
            dampening,
            nesterov,
            ..
        } => {
            let d_p = if momentum == 0.0 {
                grad
            } else {
                match st.buffers.first_mut() {
                    // torch starts the buffer as a copy of the first (decayed) gradient.
                    None => st.buffers.push(grad.detach().copy()),
                    Some(buf) => {
                        let _ = buf.g_mul_scalar_(momentum);
                        *buf += grad.g_mul_scalar(1.0 - dampening);
                    }
                }
                let buf = &st.buffers[0];
                if nesterov {
                    &grad + buf * momentum
                } else {
                    buf.shallow_clone()
                }
            };
            *param -= d_p * lr;
        }
    }
}

/// The two moment buffers of Adam/Adamax, zero-initialised on the first step.
fn moments<'a>(buffers: &'a mut Vec<Tensor>, param: &Tensor) -> (&'a mut Tensor, &'a mut Tensor) {
    if buffers.is_empty() {
        *buffers = vec![param.zeros_like(), param.zeros_like()];
    }
    let (a, b) = buffers.split_at_mut(1);
    (&mut a[0], &mut b[0])
}
