#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (not part of CI). Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fixture hours counts)
mkdir -p corpus/fixture
# seed the fixture corpus with the project's own documents
cp ../fixtures/*.json corpus/fixture/ 2>/dev/null || true
for t in "${targets[@]}"; do
  echo "== $t for ${secs}s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096 2>&1 | grep -E "^(#[0-9]+.*(DONE|NEW)|Done|==|SUMMARY|artifact)" | tail -n 3
done
