#!/usr/bin/env python3
"""PyTorch version of the trainer's recipes, for the fidelity comparison (ours vs PyTorch).

Trains torchvision's Inception3 in the tf2015 variant (3x3 average pools exclude the padding,
Mixed_7c's pool branch max-pools; weights from `just weights`) with a new 102-class head on the
official train ids (setid.mat `trnid`) and validates on `valid` after every epoch, exactly as
`trainer run --recipe reference|fast` does (see crates/flowers-trainer/src/recipe.rs):

  reference  Adamax lr 1e-2 on the reference policy (Keras' last 50 layers' convolutions, every
             BatchNorm beta, the head), constant lr.
  fast       FAST["head_epochs"] head-only epochs (Adamax FAST["head_lr"], frozen backbone,
             BatchNorms in eval mode), then the `top` policy (the reference convolutions and the
             head, every BatchNorm still frozen in eval mode) with Adamax at FAST["lr"] for the
             head and FAST["lr"] * FAST["backbone_scale"] for the convolutions, cosine to lr/100
             over the remaining steps; label smoothing 0.1 throughout.

--policy/--lr/--backbone-scale/--head-epochs/--head-lr/--schedule/--smoothing override the
recipe's values (for choosing them); --cache DIR keeps the decoded images between runs. Like the
trainer, it computes the frozen trunk of each (image, flip) once under `head` and `top`
(--no-trunk-cache: every time).

Both flip training images at random (p = 1/2); batch 32; images centre-cropped and resized like
bench/reference_loader.py; input x / 127.5 - 1. Prints one line per epoch and, last,
`accuracy=<top-1 of the last validation>`.

    python3 bench/train_recipe.py --data ../shared/flowers/102flowers-trainval.tgz \
        --labels ../shared/flowers/imagelabels.mat --setid ../shared/flowers/setid.mat \
        --recipe fast --epochs 8 --threads 2
"""
import argparse
import math
import os
import sys
import tarfile
import time

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
import torchvision

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
import reference_loader  # noqa: E402
import safetensors_io  # noqa: E402
from train_step import apply_policy, to_model_input  # noqa: E402

BATCH = 32


def tf2015_e_last_forward(self, x):
    """torchvision InceptionE._forward with TF's max-pooled branch (Mixed_7c of the 2015 graph)."""
    branch1x1 = self.branch1x1(x)
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
    branch_pool = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
    return [branch1x1, branch3x3, branch3x3dbl, branch_pool]


class _ExcludePadF:
    """torchvision.models.inception's `F`, with average pools that exclude the padding (TF)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def avg_pool2d(x, kernel_size, stride=None, padding=0, **kw):
        return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)


def build_model(weights):
    torchvision.models.inception.F = _ExcludePadF()
    model = torchvision.models.Inception3(num_classes=102, aux_logits=False, init_weights=False, transform_input=False)
    model.Mixed_7c._forward = tf2015_e_last_forward.__get__(model.Mixed_7c)
    tensors, meta = safetensors_io.load(weights)
    if meta.get("variant") != "tf2015":
        raise SystemExit(f"{weights}: variant {meta.get('variant')!r}, expected tf2015")
    backbone = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_split(args):
    labels = scipy.io.loadmat(args.labels)["labels"].ravel().astype(np.int64) - 1
    setid = scipy.io.loadmat(args.setid)
    wanted = {"train": set(setid["trnid"].ravel().tolist()), "val": set(setid["valid"].ravel().tolist())}
    out = {"train": ([], []), "val": ([], [])}
    with tarfile.open(args.data, "r:*") as archive:
        for member in archive:
            name = os.path.basename(member.name)
            if not (member.isfile() and name.startswith("image_") and name.endswith(".jpg")):
                continue
            number = int(name[6:11])
            split = next((s for s, ids in wanted.items() if number in ids), None)
            if split is None:
                continue
            img = reference_loader.load_image(archive.extractfile(member).read(), args.img_size)
            if img is None:
                continue
            out[split][0].append(np.rint((img + 1.0) * 127.5).astype(np.uint8))
            out[split][1].append(labels[number - 1])
    return {s: (torch.from_numpy(np.stack(x)), torch.tensor(y)) for s, (x, y) in out.items()}


# crates/flowers-trainer/src/recipe.rs, Hyper::new.
REFERENCE = dict(policy="reference", lr=1e-2, backbone_scale=1.0, schedule="constant", smoothing=0.0, head_epochs=0, head_lr=1e-2)
FAST = dict(policy="top", lr=3e-3, backbone_scale=0.3, schedule="cosine", smoothing=0.1, head_epochs=3, head_lr=1e-2)


def phases(h, epochs):
    """[(first_epoch, n_epochs, policy, lr, backbone_scale, schedule, smoothing)] like Hyper::phase."""
    warm = 0 if h["policy"] == "head" else min(h["head_epochs"], max(epochs - 1, 0))
    main = (warm, epochs - warm, h["policy"], h["lr"], h["backbone_scale"], h["schedule"], h["smoothing"])
    return ([(0, warm, "head", h["head_lr"], 1.0, "constant", h["smoothing"])] if warm else []) + [main]


def lr_at(lr, schedule, step, total):
    if schedule == "constant":
        return lr
    min_lr = lr / 100
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


TRUNK = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
         "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a"]


def flipped_input(x_u8, flips):
    """Model input with sample i mirrored where flips[i] (to_model_input's flip, chosen by the caller)."""
    x = to_model_input(x_u8, flip=False)
    return torch.where(torch.tensor(flips).view(-1, 1, 1, 1), x.flip(3), x)


class TrunkCache:
    """The trainer's trunk cache (crates/flowers-trainer/src/trunk_cache.rs): while the trunk (stem to
    Mixed_7a) is frozen (`head`, `top`), its output per (image, flip) is computed once; the logits
    are the same as the whole forward's."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.entries = {}

    def logits(self, model, policy, x_u8, keys, flip):
        flips = (torch.rand(len(keys)) < 0.5).tolist() if flip else [False] * len(keys)
        if not (self.enabled and policy in ("head", "top")):
            self.entries.clear()
            return model(flipped_input(x_u8, flips))
        missing = [i for i, (k, f) in enumerate(zip(keys, flips)) if (k, f) not in self.entries]
        if missing:
            with torch.no_grad():
                h = flipped_input(x_u8[missing], [flips[i] for i in missing])
                for name in TRUNK:
                    h = getattr(model, name)(h)
            for j, i in enumerate(missing):
                self.entries[(keys[i], flips[i])] = h[j].clone()
        h = torch.stack([self.entries[(k, f)] for k, f in zip(keys, flips)])
        h = model.avgpool(model.Mixed_7c(model.Mixed_7b(h)))
        return model.fc(model.dropout(torch.flatten(h, 1)))


def evaluate(model, policy, cache, x, y):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), BATCH):
            keys = [("val", j) for j in range(i, min(i + BATCH, len(y)))]
            logits = cache.logits(model, policy, x[i : i + BATCH], keys, flip=False)
            correct += (logits.argmax(1) == y[i : i + BATCH]).sum().item()
    return correct / len(y)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--setid", required=True)
    ap.add_argument("--weights", default=os.path.join(HERE, "..", "weights", "inception_v3_tf2015.safetensors"))
    ap.add_argument("--recipe", choices=["reference", "fast"], default="reference")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=299)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="directory for the decoded images (reused when present)")
    ap.add_argument("--no-trunk-cache", action="store_true", help="recompute the frozen trunk every time")
    ap.add_argument("--policy", choices=["reference", "head", "top", "all"])
    for flag, kind in [("lr", float), ("backbone-scale", float), ("head-epochs", int), ("head-lr", float), ("smoothing", float)]:
        ap.add_argument(f"--{flag}", type=kind)
    ap.add_argument("--schedule", choices=["constant", "cosine"])
    args = ap.parse_args()
    h = dict(REFERENCE if args.recipe == "reference" else FAST)
    for key in h:
        if getattr(args, key) is not None:
            h[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    cached = args.cache and os.path.join(args.cache, f"flowers_official_{args.img_size}.pt")
    if cached and os.path.exists(cached):
        data = torch.load(cached)
    else:
        data = load_split(args)
        if cached:
            os.makedirs(args.cache, exist_ok=True)
            torch.save(data, cached)
    (xt, yt), (xv, yv) = data["train"], data["val"]
    print(f"train={len(yt)} val={len(yv)} img_size={args.img_size} preprocess_s={time.perf_counter() - t0:.1f} {h}", flush=True)
    model = build_model(args.weights)
    cache = TrunkCache(not args.no_trunk_cache)
    steps_per_epoch = math.ceil(len(yt) / BATCH)
    start = time.perf_counter()
    acc = float("nan")
    for first, n_epochs, policy, lr, scale, schedule, smoothing in phases(h, args.epochs):
        frozen_bns = apply_policy(model, policy)
        head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("fc.")]
        backbone = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("fc.")]
        groups = [{"params": backbone, "scale": scale}] if backbone else []
        opt = torch.optim.Adamax(groups + [{"params": head, "scale": 1.0}], lr=lr)
        for epoch in range(first, first + n_epochs):
            model.train()
            for bn in frozen_bns:
                bn.eval()
            order = torch.from_numpy(rng.permutation(len(yt)))
            loss_sum = correct = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * BATCH : (b + 1) * BATCH]
                step = (epoch - first) * steps_per_epoch + b
                base = lr_at(lr, schedule, step, n_epochs * steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = base * g["scale"]
                keys = [("train", j) for j in idx.tolist()]
                logits = cache.logits(model, policy, xt[idx], keys, flip=True)
                loss = F.cross_entropy(logits, yt[idx], label_smoothing=smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
                correct += (logits.argmax(1) == yt[idx]).sum().item()
            acc = evaluate(model, policy, cache, xv, yv)
            print(
                f"epoch={epoch} policy={policy} train_loss={loss_sum / len(yt):.4f} "
                f"train_acc={correct / len(yt):.3f} val_acc={acc:.4f} elapsed_s={time.perf_counter() - start:.0f}",
                flush=True,
            )
    print(f"accuracy={acc:.4f}")


if __name__ == "__main__":
    main()
