#!/usr/bin/env bash
# Every GPU measurement in one go, for one device call: host description, prefill (recompute) of
# a Llama-3-8B-shaped model, the restore paths into GPU memory (restore_paths.py: RAM tier pinned
# and pageable, disk tier, k4v4/tq4 bytes with GPU dequant, copy floors), TTFT through
# KVTierCache (daemon_ttft.py), and optionally `kvtier bench disk`. JSON under $OUT (default
# ./out-gpu). Expects .device/bin from prepare_device.sh (kvtier, kvtierd, liburing.so.2) and
# python3 with torch + transformers. Each step is bounded so that the rest still runs.
# STEPS picks the steps (default "prefill restore ttft"); PREFILL_JSON reuses an earlier
# prefill.json for the ratios when prefill is not among them; RESTORE_ARGS adds arguments to
# restore_paths.py (e.g. "--disk-codec tq3 --codecs tq3") and RESTORE_TAG to its JSON's name.
set -u
OUT=${OUT:-$PWD/out-gpu}
mkdir -p "$OUT"
BIN=${KVTIER_BIN_DIR:-.device/bin}
BIN=$(cd "$BIN" && pwd)
export LD_LIBRARY_PATH=$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
TOKENS=${TOKENS:-16384}
DIR=${BENCH_DIR:-/tmp}
# tmpfs has no O_DIRECT and no page cache to drop: use a disk-backed folder instead.
if [ -z "${BENCH_DIR:-}" ] && [ "$(df --output=fstype "$DIR" | tail -1)" = tmpfs ]; then DIR=/var/tmp; fi
export TMPDIR=$DIR   # kvtierd's state directories (LocalDaemon) go here too
HERE=$(cd "$(dirname "$0")" && pwd)
DROP=""
[ "$(id -u)" -eq 0 ] && DROP=--drop-caches
exec > >(tee "$OUT/log.txt") 2>&1
step() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local s=$SECONDS
  PYTHONUNBUFFERED=1 timeout "$limit" "$@"
  echo "== $name: rc=$? in $((SECONDS - s)) s"
}
echo "== host"
{
  date -u; uname -a; nproc; free -g; nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-200
  echo "== bench dir $DIR"; df -T "$DIR"; ulimit -l
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  ldd "$BIN/kvtierd"
}
STEPS=${STEPS:-prefill restore ttft}
PREFILL_JSON=${PREFILL_JSON:-$OUT/prefill.json}
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
has prefill && step prefill "${PREFILL_TIMEOUT:-180}" python3 "$HERE/prefill.py" --tokens "$TOKENS" --repeats 3 --out "$PREFILL_JSON"
# shellcheck disable=SC2086  # RESTORE_ARGS is split on purpose
has restore && step restore "${RESTORE_TIMEOUT:-180}" python3 "$HERE/restore_paths.py" --daemon "$BIN/kvtierd" --kvtier "$BIN/kvtier" \
  --tokens "$TOKENS" --prefill "$PREFILL_JSON" $DROP --out "$OUT/restore${RESTORE_TAG:-}.json" ${RESTORE_ARGS:-}
has ttft && step ttft "${TTFT_TIMEOUT:-180}" python3 "$HERE/daemon_ttft.py" --daemon "$BIN/kvtierd" --tokens "$TOKENS" --repeats 3 \
  $DROP --out "$OUT/ttft-k4v4.json"
for c in ${CODECS:-}; do   # e.g. CODECS="k4v4 fp16": kvtier bench disk per codec
  step "disk $c" "${DISK_TIMEOUT:-120}" sh -c "\"$BIN/kvtier\" bench disk --dir \"$DIR\" --codec $c --json > \"$OUT/disk-$c.json\""
done
echo "== done"
