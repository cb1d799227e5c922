#!/usr/bin/env python3
"""PyTorch reference for `trainer bench`: times the same training step on generated input.

torchvision Inception3 (aux_logits=False, init_weights=False, 102 classes), the same trainable
policy (see flowers-model: `reference` = the Keras notebook's last-50-layer convolutions, every
BatchNorm beta, fc; `head` = fc only with BatchNorms in eval mode; `top` = the reference
convolutions and fc with BatchNorms in eval mode; `all`), the same optimizer and
the same step: uint8 NHWC -> float NCHW in [-1, 1] with random flips, forward, cross-entropy,
zero_grad, backward, update. Prints `images_per_s=<n>`.

    python3 bench/train_step.py --batch-size 8 --img-size 150 --threads 2 --trainable reference
"""
import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

# flowers_model::REFERENCE_TRAINABLE_CONVS
REFERENCE_TRAINABLE_CONVS = [
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
]


def apply_policy(model, policy):
    """Sets requires_grad per the policy; returns the BatchNorms that stay in eval mode."""
    frozen_bns = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
            if policy in ("head", "top"):
                frozen_bns.append(module)
    for name, p in model.named_parameters():
        if name.startswith("fc.") or policy == "all":
            p.requires_grad_(True)
        elif policy == "head":
            p.requires_grad_(False)
        elif name.endswith(".bn.bias") and policy == "reference":
            p.requires_grad_(True)
        elif name.endswith(".conv.weight"):
            p.requires_grad_(name[: -len(".conv.weight")] in REFERENCE_TRAINABLE_CONVS)
        else:
            p.requires_grad_(False)
    return frozen_bns


def make_optimizer(kind, params, lr):
    if kind == "adamax":
        return torch.optim.Adamax(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def to_model_input(batch_u8, flip):
    x = batch_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if flip:
        mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x.contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=150)
    ap.add_argument("--trainable", choices=["reference", "head", "top", "all"], default="reference")
    ap.add_argument("--optimizer", choices=["adamax", "adam", "sgd"], default="adamax")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.Inception3(num_classes=102, aux_logits=False, init_weights=False, transform_input=False)
    frozen_bns = apply_policy(model, args.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(args.optimizer, params, args.lr)
    model.train()
    for bn in frozen_bns:
        bn.eval()

    n, s = args.batch_size, args.img_size
    pixels = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8)
    labels = torch.randint(0, 102, (n,))

    def step():
        x = to_model_input(pixels, flip=True)
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    secs = time.perf_counter() - t0
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()} batch_size={n} img_size={s} "
        f"trainable={args.trainable} optimizer={args.optimizer} steps={args.steps} last_loss={loss:.4f}"
    )
    print(f"step_ms={1e3 * secs / args.steps:.1f}")
    print(f"images_per_s={n * args.steps / secs:.2f}")


if __name__ == "__main__":
    main()
