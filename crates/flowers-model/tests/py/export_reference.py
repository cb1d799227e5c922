#!/usr/bin/env python3
"""Writes PyTorch reference results for flowers-model's Rust tests, as safetensors in OUT_DIR.

  export_reference.py tf2015 OUT_DIR       weights.safetensors (via scripts/convert_fid_inception.py)
                                           + case.safetensors {input, features}: the TorchScript's
                                           2048-d pool features of default_1.pt
  export_reference.py torchvision OUT_DIR  weights.safetensors (torchvision Inception3, variant
                                           torchvision) + case.safetensors {input, logits_eval,
                                           logits_train, <bn>.running_mean/var after the train pass}
  export_reference.py optim OUT_DIR        case.safetensors: torch.optim.{Adamax,Adam,SGD} runs
"""
import os
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import convert_fid_inception  # noqa: E402
import safetensors_io  # noqa: E402

torch.set_num_threads(2)


def tf2015(out):
    src = convert_fid_inception.default_src()
    tensors = convert_fid_inception.convert(src)
    safetensors_io.save(
        os.path.join(out, "weights.safetensors"),
        tensors,
        {"variant": "tf2015", "source": convert_fid_inception.SOURCE},
    )
    net = torch.jit.load(src, map_location="cpu").eval()
    g = torch.Generator().manual_seed(1)
    # default_1.pt ends with a fixed 8x8 average pool, so it needs the native 299x299 input.
    x = torch.rand(2, 3, 299, 299, generator=g) * 2 - 1
    with torch.no_grad():
        feats = net(x)
    safetensors_io.save(os.path.join(out, "case.safetensors"), {"input": x, "features": feats})


def torchvision_case(out):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.Inception3(
        num_classes=102, aux_logits=False, transform_input=False, init_weights=True, dropout=0.0
    )
    # Random BN affine parameters, then realistic running statistics calibrated after them
    # (cumulative average over two passes), so activations stay O(1) through 94 layers.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
            m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.rand(4, 3, 75, 75) * 2 - 1)
    for m in bns:
        m.momentum = 0.1
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    safetensors_io.save(
        os.path.join(out, "weights.safetensors"),
        weights,
        {"variant": "torchvision", "source": "torchvision Inception3 random init (test)"},
    )
    x = torch.rand(2, 3, 75, 75, generator=torch.Generator().manual_seed(2)) * 2 - 1
    case = {"input": x}
    with torch.no_grad():
        model.eval()
        case["logits_eval"] = model(x)
        model.train()
        case["logits_train"] = model(x)
    for k, v in model.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            case[f"after_train.{k}"] = v
    safetensors_io.save(os.path.join(out, "case.safetensors"), case)


OPTIMIZERS = {
    # name: (constructor, kwargs); each run has two groups with lr scales 1 and 0.1.
    "adamax": (torch.optim.Adamax, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
}
STEPS = 6
BASE_LR = 0.01


def step_lr(t):
    return BASE_LR * (1.0 - 0.1 * t)


def optim(out):
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (4, 3), "b": (5,), "c": (2, 2, 3)}
    init = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    grads = {f"grad.{t}.{k}": torch.randn(s, generator=g) for t in range(STEPS) for k, s in shapes.items()}
    case = {f"init.{k}": v for k, v in init.items()}
    case.update(grads)
    for name, (cls, kw) in OPTIMIZERS.items():
        params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        groups = [
            {"params": [params["a"], params["b"]], "lr": BASE_LR, "scale": 1.0},
            {"params": [params["c"]], "lr": BASE_LR * 0.1, "scale": 0.1},
        ]
        opt = cls([{"params": gr["params"], "lr": gr["lr"]} for gr in groups], **kw)
        for t in range(STEPS):
            for gi, gr in enumerate(groups):
                opt.param_groups[gi]["lr"] = step_lr(t) * gr["scale"]
            for k, p in params.items():
                p.grad = grads[f"grad.{t}.{k}"].clone()
            opt.step()
        for k, p in params.items():
            case[f"{name}.final.{k}"] = p.detach()
            for sk, sv in opt.state[p].items():
                case[f"{name}.state.{k}.{sk}"] = sv.detach().to(torch.float32)
    safetensors_io.save(
        os.path.join(out, "case.safetensors"),
        case,
        {"steps": str(STEPS), "base_lr": str(BASE_LR)},
    )


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("tf2015", "torchvision", "optim"):
        sys.exit(__doc__)
    os.makedirs(sys.argv[2], exist_ok=True)
    {"tf2015": tf2015, "torchvision": torchvision_case, "optim": optim}[sys.argv[1]](sys.argv[2])


if __name__ == "__main__":
    main()
