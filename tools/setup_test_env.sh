#!/usr/bin/env bash
# What `cargo test --workspace` needs besides redis-server, fetched once into git-ignored places:
# the Python environment .venv-ci/ (NVRTC for the kernel check, grpcio for the Python client test,
# kubernetes-validate for the manifests) and the small real weights some tests run
# (MobileSAM, 40 MB; all-MiniLM-L6-v2, 90 MB; both hash-checked, into .cache/weights/).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv-ci/bin/python ] || python3 -m venv .venv-ci
.venv-ci/bin/pip install -q --disable-pip-version-check -r tools/requirements-ci.txt
tools/fetch_mobile_sam.sh .venv-ci/bin/python
PYTHON=.venv-ci/bin/python tools/fetch_minilm.sh
