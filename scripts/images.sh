#!/usr/bin/env bash
# Builds the project's images (flowers-loader, flowers-coordinator, flowers-trainer) with
# deploy/Dockerfile on a machine without a container registry.
#
#   scripts/images.sh [--profile debug|release]   the host's build (deploy/prebuilt/), fast
#   scripts/images.sh --compile                   cargo and pip inside the build stage, as users
#                                                 build it, from an offline package cache
#
# The bases are made here (mmdebstrap + docker import; RabbitMQ from Debian's rabbitmq-server)
# and kept, so a second call only rebuilds what changed. Starts dockerd where none runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/docker-env.sh

profile=release
mode=prebuilt
while (($#)); do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --compile) mode=compile; shift ;;
    *) echo "images: unknown argument $1" >&2; exit 2 ;;
  esac
done

cache=$root/.cache/images
mkdir -p "$cache"
site=$root/.venv/lib/python3.11/site-packages

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# ---- bases ----
if ! have_image "$DEBIAN_IMAGE"; then
  command -v mmdebstrap >/dev/null || apt_install mmdebstrap
  echo "images: making $DEBIAN_IMAGE (mmdebstrap bookworm)"
  mmdebstrap --quiet --variant=minbase bookworm "$cache/debian-bookworm.tar"
  docker import "$cache/debian-bookworm.tar" "$DEBIAN_IMAGE" >/dev/null
  rm -f "$cache/debian-bookworm.tar"
fi
if ! have_image "$RABBITMQ_IMAGE"; then
  echo "images: making $RABBITMQ_IMAGE (Debian's rabbitmq-server)"
  build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$RABBITMQ_IMAGE" deploy/bases/rabbitmq
fi

# ---- what the build stage would make ----
args=(--build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE")
if [ "$mode" = prebuilt ]; then
  for bin in loader trainer coordinator flowersctl; do
    [ -x "target/$profile/$bin" ] || { echo "images: target/$profile/$bin missing: build the workspace's binaries ($profile) first" >&2; exit 1; }
  done
  [ -f weights/inception_v3_tf2015.safetensors ] || { echo "images: weights/ missing: run just weights" >&2; exit 1; }
  stage=deploy/prebuilt
  rm -rf "$stage"
  mkdir -p "$stage/bin" "$stage/weights"
  # Hard links where the file system allows: the libraries alone are 3.7 GB.
  link() { cp -al "$1" "$2" 2>/dev/null || cp -a "$1" "$2"; }
  for bin in loader trainer coordinator flowersctl; do link "target/$profile/$bin" "$stage/bin/$bin"; done
  link weights/inception_v3_tf2015.safetensors "$stage/weights/"
  link "$site/torch/lib" "$stage/torch-lib"
  link "$site/nvidia" "$stage/nvidia"
  args+=(--build-arg ARTIFACTS=prebuilt)
else
  scripts/images-offline-base.sh
  args+=(--build-arg ARTIFACTS=compile --build-arg RUST_IMAGE="$RUST_OFFLINE_IMAGE")
fi

for target in coordinator loader trainer; do
  start=$SECONDS
  build "${args[@]}" -f deploy/Dockerfile --target "$target" -t "flowers-$target:latest" .
  echo "images: flowers-$target:latest ($mode, $((SECONDS - start)) s, $(docker image inspect -f '{{.Size}}' "flowers-$target:latest" | awk '{printf "%.0f MB", $1/1e6}'))"
done
[ "$mode" = prebuilt ] && rm -rf deploy/prebuilt
exit 0
