#!/usr/bin/env bash
# Builds what the GPU host needs and has not (it has no Swift): static-stdlib kvtier and kvtierd,
# stripped so that both fit the device tool's 64 MiB carry, with liburing.so.2 beside them, in the
# git-ignored .device/bin. Then, with the device tool: run `bash Benchmarks/gpu/run_device.sh`
# with carry [".device/bin"]. See README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
swift build -c release --static-swift-stdlib
mkdir -p .device/bin
for b in kvtier kvtierd; do strip -o ".device/bin/$b" ".build/release/$b"; done
cp -L /lib/x86_64-linux-gnu/liburing.so.2 .device/bin/
LD_LIBRARY_PATH=.device/bin ldd .device/bin/kvtierd | grep -v -E 'linux-vdso|ld-linux' || true
du -ch .device/bin/* | tail -1
