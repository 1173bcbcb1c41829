#!/usr/bin/env bash
# The whole test suite on any machine, fresh or not: sets up what the tests need
# (tools/setup_test_env.sh: redis-server, the Python test environment, two small real checkpoints;
# it checks that kubectl is there), then runs `cargo test --workspace`. Extra arguments go to
# cargo test (e.g. `tools/test.sh -p gateway`).
set -euo pipefail
cd "$(dirname "$0")/.."

tools/setup_test_env.sh
# The toolchain pinned in rust-toolchain.toml (rustup installs it on first use).
if command -v rustup >/dev/null; then rustup show active-toolchain >/dev/null; fi
if [ $# -eq 0 ]; then set -- --workspace; fi
exec cargo test "$@"
