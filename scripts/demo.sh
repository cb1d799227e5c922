#!/usr/bin/env bash
# One real training run on this machine: a coordinator, a loader and N trainers as separate
# processes against the local RabbitMQ, live progress, then the per-epoch validation accuracy
# and the best checkpoint. Every process started here is stopped on success, failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<USAGE
usage: just demo [--epochs N] [--trainers N] [--img-size PX] [--classes N] [--recipe reference|fast]
                 [--batch-size N] [--sync-every K] [--eval-every FRACTION] [--threads-per-trainer N]
Defaults finish in about 10 minutes on a 2-core CPU.
USAGE
}

epochs=6 trainers=2 img_size=224 classes=0 recipe=fast batch_size=32 sync_every=10 eval_every=1 threads=""
while (($#)); do
  case "$1" in
    --epochs) epochs=$2; shift 2 ;;
    --trainers) trainers=$2; shift 2 ;;
    --img-size) img_size=$2; shift 2 ;;
    --classes) classes=$2; shift 2 ;;
    --recipe) recipe=$2; shift 2 ;;
    --batch-size) batch_size=$2; shift 2 ;;
    --sync-every) sync_every=$2; shift 2 ;;
    --eval-every) eval_every=$2; shift 2 ;;
    --threads-per-trainer) threads=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
# Share the cores between the trainers (libtorch would otherwise start one thread per core each).
cores=$(nproc)
threads=${threads:-$(( cores / trainers > 0 ? cores / trainers : 1 ))}

data_dir=$(scripts/fetch-data.sh)
archive=""
for f in "$data_dir"/102flowers*.tgz "$data_dir"/102flowers*.tar; do
  if [ -f "$f" ]; then archive=$f; break; fi
done
bin=target/release
run_id="demo-$(date +%Y%m%d-%H%M%S)"
out="out/$run_id"
mkdir -p "$out"
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export FLOWERS_TOKEN=$token
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
coordinator="http://127.0.0.1:$port"

pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # The run is over (or abandoned): its queues go, with whatever they still hold.
  "$bin/loader" delete-queues --run-id "$run_id" --epochs "$epochs" --eval-every "$eval_every" \
    >>"$out/loader.log" 2>&1 || echo "demo: could not delete the run's queues; see $out/loader.log" >&2
  echo "demo: stopped ${#pids[@]} processes; logs in $out/" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "demo: run $run_id: $trainers trainers x $threads threads, $epochs epochs at ${img_size}px, recipe $recipe; data $archive"
"$bin/coordinator" --listen "127.0.0.1:$port" --state-dir "$out/coordinator" --sync-every "$sync_every" \
  >"$out/coordinator.log" 2>&1 &
pids+=($!)

limit=()
if ((classes > 0)); then limit=(--classes "$classes"); fi
"$bin/loader" run --data "$archive" --labels "$data_dir/imagelabels.mat" --run-id "$run_id" \
  --epochs "$epochs" --eval-every "$eval_every" --img-size "$img_size" --batch-size "$batch_size" \
  --coordinator "$coordinator" \
  --cache-dir "$out" "${limit[@]}" >"$out/loader.log" 2>&1 &
pids+=($!)

for i in $(seq 1 "$trainers"); do
  "$bin/trainer" run --run-id "$run_id" --epochs "$epochs" --coordinator "$coordinator" \
    --recipe "$recipe" --threads "$threads" --checkpoint-dir "$out/trainer-$i" \
    >"$out/trainer-$i.log" 2>&1 &
  pids+=($!)
done

# The loader registers the run once it has preprocessed the images.
ctl=("$bin/flowersctl" --coordinator "$coordinator")
until "${ctl[@]}" status "$run_id" >/dev/null 2>&1; do
  if ! kill -0 "${pids[1]}" 2>/dev/null; then
    echo "demo: the loader stopped before registering the run:" >&2
    tail -n 5 "$out/loader.log" >&2
    exit 1
  fi
  sleep 1
done

# Live progress until the run finishes (or a process dies).
"${ctl[@]}" watch "$run_id" &
watcher=$!
pids+=("$watcher")
while kill -0 "$watcher" 2>/dev/null; do
  for pid in "${pids[@]:0:$((trainers + 2))}"; do
    if ! kill -0 "$pid" 2>/dev/null && ! wait "$pid"; then
      echo "demo: a process exited with an error; see $out/*.log" >&2
      tail -n 5 "$out"/*.log >&2
      exit 1
    fi
  done
  sleep 2
done
wait "$watcher"

"${ctl[@]}" status "$run_id"
best=$("${ctl[@]}" status "$run_id" --json | python3 -c 'import json, sys; b = json.load(sys.stdin)["best"]; print(b["path"] if b else "")')
[ -n "$best" ] && echo "best checkpoint: $out/coordinator/$best"
"${ctl[@]}" plot "$run_id" -o "$out/curves.png" >/dev/null && echo "curves: $out/curves.png"
