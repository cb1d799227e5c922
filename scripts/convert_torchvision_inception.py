#!/usr/bin/env python3
"""Converts a torchvision inception_v3 state dict (e.g. IMAGENET1K_V1's inception_v3_google-*.pth)
into safetensors with metadata variant "torchvision". Drops AuxLogits.* and num_batches_tracked;
keeps fc unless --drop-fc (the Rust loader ignores a head whose class count differs anyway).

Note: IMAGENET1K_V1 was trained with transform_input=True (ImageNet mean/std input). Our model
takes [-1, 1] input; torchvision's transform_input maps ImageNet-normalised input to exactly
(x - 0.5) / 0.5, i.e. [-1, 1], so feeding [-1, 1] directly is the same network.

Usage: convert_torchvision_inception.py --src inception_v3_google.pth --out weights/inception_v3_torchvision.safetensors
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402


def convert(state, drop_fc):
    out = {}
    for name, t in state.items():
        if name.startswith("AuxLogits.") or name.endswith("num_batches_tracked"):
            continue
        if drop_fc and name.startswith("fc."):
            continue
        out[name] = t.detach().float()
    if "Mixed_7c.branch_pool.conv.weight" not in out:
        raise SystemExit("not an Inception3 state dict: Mixed_7c.branch_pool.conv.weight missing")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="state dict .pth (or a full pickled model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--drop-fc", action="store_true")
    ap.add_argument("--source", default=None, help="metadata 'source' (default: the --src file name)")
    args = ap.parse_args()
    state = torch.load(args.src, map_location="cpu", weights_only=False)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = convert(state, args.drop_fc)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {
        "variant": "torchvision",
        "source": args.source or os.path.basename(args.src),
        "bn_eps": "0.001",
        "input": "float NCHW RGB in [-1, 1]",
    }
    safetensors_io.save(args.out, tensors, meta)
    print(f"wrote {args.out}: {len(tensors)} tensors, variant torchvision")


if __name__ == "__main__":
    main()
