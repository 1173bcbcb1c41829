#!/usr/bin/env bash
# Everything `cargo test --workspace` needs, checked or installed once (tools/test.sh runs this
# first; running it again is quick and changes nothing):
# - system programs: redis-server (the end-to-end and cache tests start their own) and Python's
#   venv module, installed with apt-get when missing; kubectl (its built-in kustomize renders the
#   deploy overlays), which must be on the machine already;
# - the Python environment .venv-ci/ (NVRTC for the kernel check, grpcio for the Python client
#   test, kubernetes-validate for the manifests);
# - the Python environment .venv-labelstudio/ (Label Studio itself, for the test that connects it
#   to the gateway's ML back end; its Django pins stay out of .venv-ci) and a migrated Label Studio
#   database in .cache/label-studio-VERSION/;
# - the small real weights some tests run (MobileSAM, 40 MB; all-MiniLM-L6-v2, 90 MB; both
#   hash-checked, into .cache/weights/).
# - the annotation page's npm packages (gateway/web/package-lock.json), with `npm ci` when the
#   lockfile changed since the last install.
# protoc needs nothing: the proto crate builds with a vendored copy.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The annotation page's browser test: Node and npm (the page's build tools, Playwright) and
# Debian's Chromium, which Playwright drives (its own browser downloads are not used).
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! kubectl version --client >/dev/null 2>&1; then
  echo "setup: kubectl is missing; the deploy tests render deploy/kubernetes with" \
    "\`kubectl kustomize\` and will fail without it (https://kubernetes.io/docs/tasks/tools/)" >&2
fi

[ -x .venv-ci/bin/python ] || python3 -m venv .venv-ci
.venv-ci/bin/pip install -q --disable-pip-version-check -r tools/requirements-ci.txt
[ -x .venv-labelstudio/bin/python ] || python3 -m venv .venv-labelstudio
.venv-labelstudio/bin/pip install -q --disable-pip-version-check -r tools/requirements-labelstudio.txt
# A migrated Label Studio database for that test to copy: migrating takes minutes, starting on a
# copy seconds (`label-studio version` applies the migrations and exits).
ls_template=".cache/label-studio-$(sed -n 's/^label-studio==//p' tools/requirements-labelstudio.txt)"
if [ ! -f "$ls_template/label_studio.sqlite3" ]; then
  echo "setup: migrating a Label Studio database into $ls_template"
  mkdir -p "$ls_template"
  LABEL_STUDIO_BASE_DATA_DIR="$PWD/$ls_template" LATEST_VERSION_CHECK=false \
    .venv-labelstudio/bin/label-studio version >/dev/null
fi
tools/fetch_mobile_sam.sh .venv-ci/bin/python
PYTHON=.venv-ci/bin/python tools/fetch_minilm.sh

lock_hash=$(sha256sum gateway/web/package-lock.json | cut -d' ' -f1)
stamp=gateway/web/node_modules/.installed-lock-sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_hash" ]; then
  echo "setup: npm ci in gateway/web"
  (cd gateway/web && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$lock_hash" > "$stamp"
fi
