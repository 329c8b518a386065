#!/usr/bin/env bash
# Build the libFuzzer targets with coverage instrumentation (as cargo-fuzz would, on the stable
# toolchain) and run each for a while: ./run.sh [seconds per target, default 10] [target...]
# Seeds (valid inputs to start from) are in seeds/<target>/; findings land in native/fuzz/artifacts/<target>/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(v2_request record envelope)
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=target
# an explicit --target keeps the instrumentation off build scripts, as cargo-fuzz does
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build -q --release --bins --target "$host"
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    echo "fuzzing $target for ${seconds}s" >&2
    "target/$host/release/$target" -max_total_time="$seconds" -max_len=4096 -print_final_stats=0 \
        -artifact_prefix="artifacts/$target/" "corpus/$target" "seeds/$target" 2>&1 | tail -n 3
    test "${PIPESTATUS[0]}" -eq 0
done
