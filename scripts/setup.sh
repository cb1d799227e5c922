#!/usr/bin/env bash
# Installs what the build and tests need. Idempotent; fast when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# System libraries: libturbojpeg for JPEG decoding, docker-compose to validate compose files.
missing=()
dpkg -s libturbojpeg0-dev >/dev/null 2>&1 || missing+=(libturbojpeg0-dev)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The project venv: torch 2.11.0 is the libtorch that tch 0.24 builds against.
stamp=.venv/.flowers-setup-v1
requirements=scripts/requirements.txt
if [ ! -f "$stamp" ] || [ "$requirements" -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi

# RabbitMQ must be up for the integration tests; start it where it is installed but down.
if command -v rabbitmq-server >/dev/null 2>&1 && ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "setup: starting rabbitmq-server"
  rabbitmq-server -detached
  for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi
