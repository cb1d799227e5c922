# Sourced by the scripts that use Docker: a running engine, a BuildKit-capable `build`, the
# names of the bases made here. Leaves the host's firewall alone (no iptables rules).

# Bases made locally by scripts/images.sh, standing in for the official images.
export DEBIAN_IMAGE=${DEBIAN_IMAGE:-flowers-base/debian:bookworm-slim}
export RABBITMQ_IMAGE=${RABBITMQ_IMAGE:-flowers-base/rabbitmq:3-management}
export RUST_OFFLINE_IMAGE=${RUST_OFFLINE_IMAGE:-flowers-base/rust-offline:1.95-bookworm}

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker: installing docker.io (Debian's engine)"
  apt_install docker.io
fi
if ! docker info >/dev/null 2>&1; then
  echo "docker: starting dockerd (log: /var/log/flowers-dockerd.log)"
  nohup dockerd --iptables=false --ip-masq=false >/var/log/flowers-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "docker: dockerd did not start; see /var/log/flowers-dockerd.log" >&2; exit 1; }
fi

# BuildKit (RUN --mount, unused stages skipped): `docker buildx` where installed, else a
# client that still has it built in (Debian's docker.io 20.10 at /usr/bin/docker).
if docker buildx version >/dev/null 2>&1; then
  build() { docker buildx build --load --network host "$@"; }
else
  for cli in docker /usr/bin/docker; do
    major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then BUILDKIT_CLI=$cli; break; fi
  done
  [ -n "${BUILDKIT_CLI:-}" ] || { echo "docker: no client with BuildKit (install docker-buildx)" >&2; exit 1; }
  build() { DOCKER_BUILDKIT=1 "$BUILDKIT_CLI" build --network host "$@"; }
fi
