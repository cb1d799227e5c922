#!/usr/bin/env bash
# Prints the folder holding the Oxford 102 Flowers files. Uses $FLOWERS_DIR when set;
# otherwise downloads the official files into .cache/flowers and checks their MD5 sums.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${FLOWERS_DIR:-}" ]; then
  [ -f "$FLOWERS_DIR/imagelabels.mat" ] || { echo "FLOWERS_DIR=$FLOWERS_DIR has no imagelabels.mat" >&2; exit 1; }
  ls "$FLOWERS_DIR"/102flowers*.t* >/dev/null 2>&1 || { echo "FLOWERS_DIR=$FLOWERS_DIR has no 102flowers*.tgz or .tar" >&2; exit 1; }
  echo "$FLOWERS_DIR"
  exit 0
fi

base=https://www.robots.ox.ac.uk/~vgg/data/flowers/102
dir=.cache/flowers
mkdir -p "$dir"
while read -r name md5; do
  if [ -f "$dir/$name" ] && echo "$md5  $dir/$name" | md5sum -c --status; then continue; fi
  echo "fetching $base/$name" >&2
  if ! curl -fsSL --retry 2 -o "$dir/$name.part" "$base/$name"; then
    rm -f "$dir/$name.part"
    echo "could not download $base/$name (offline?). Put 102flowers.tgz, imagelabels.mat and setid.mat in a folder and set FLOWERS_DIR to it." >&2
    exit 1
  fi
  echo "$md5  $dir/$name.part" | md5sum -c --status || { echo "$name: MD5 mismatch (expected $md5)" >&2; exit 1; }
  mv "$dir/$name.part" "$dir/$name"
done <<'SUMS'
102flowers.tgz 52808999861908f626f3c1f4e79d11fa
imagelabels.mat e0620be6f572b9609742df49c70aed4d
setid.mat a5357ecc9cb78c4bef273ce3793fc85c
SUMS
echo "$dir"
