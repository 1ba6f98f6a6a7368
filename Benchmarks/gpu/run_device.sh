#!/usr/bin/env bash
# Runs the disk-tier restore benchmark and the GPU prefill benchmark on one GPU host and puts
# the JSON under $OUT (default ./out-gpu). Expects a kvtier binary at $KVTIER (default
# .device/bin/kvtier) with its shared libraries beside it (liburing.so.2), and python3 with
# torch + transformers. See README.md.
set -u
OUT=${OUT:-$PWD/out-gpu}
mkdir -p "$OUT"
BIN=${KVTIER:-.device/bin/kvtier}
LIBDIR=$(cd "$(dirname "$BIN")" && pwd)  # liburing.so.2 beside the binary; only kvtier sees it
DIR=${BENCH_DIR:-/tmp}
# tmpfs has no O_DIRECT and no page cache to drop: use a disk-backed folder instead.
if [ -z "${BENCH_DIR:-}" ] && [ "$(df --output=fstype "$DIR" | tail -1)" = tmpfs ]; then DIR=/var/tmp; fi
CODECS=${CODECS:-"k4v4 fp16 tq3m"}
HERE=$(cd "$(dirname "$0")" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
echo "== host"
{
  date -u; uname -a; nproc; free -g; nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-200
  echo "== bench dir $DIR"; df -T "$DIR"; findmnt -T "$DIR"; lsblk -o NAME,SIZE,ROTA,TYPE,MOUNTPOINT 2>/dev/null
  cat /sys/block/*/queue/scheduler 2>/dev/null | head -3
  LD_LIBRARY_PATH=$LIBDIR ldd "$BIN"
}
disk() {  # one codec, bounded so that the rest still runs
  echo "== kvtier bench disk --dir $DIR --codec $1 --json"
  local s=$SECONDS
  LD_LIBRARY_PATH=$LIBDIR timeout "${DISK_TIMEOUT:-120}" "$BIN" bench disk --dir "$DIR" --codec "$1" --json > "$OUT/disk-$1.json" 2>> "$OUT/disk.err"
  echo "rc=$? in $((SECONDS - s)) s"; cat "$OUT/disk-$1.json"; echo
}
set -- $CODECS
disk "$1"; shift   # the first codec before the GPU part, the others after it
echo "== prefill"
s=$SECONDS
PYTHONUNBUFFERED=1 timeout "${PREFILL_TIMEOUT:-240}" python3 "$HERE/prefill.py" --out "$OUT/prefill.json" ${PREFILL_ARGS:-}
echo "rc=$? in $((SECONDS - s)) s"
for c in "$@"; do disk "$c"; done
echo "== compare"
python3 "$HERE/compare.py" --prefill "$OUT/prefill.json" "$OUT"/disk-*.json --json-out "$OUT/compare.json"
