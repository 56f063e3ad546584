#!/usr/bin/env bash
# Save the image for upload to grand-challenge, as the algorithm templates' do_save.sh does.
#   ./do_save.sh [TAG]     TAG defaults to hnseg; writes TAG_YYYYMMDD-HHMMSS.tar.gz into OUT_DIR (default: here)
#                          and prints its size.
set -euo pipefail
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &>/dev/null && pwd)"
TAG="${1:-hnseg}"

# Grand-challenge refuses an uploaded container image above COMPONENTS_MAXIMUM_IMAGE_SIZE = 10 * GIGABYTE
# (= 10_737_418_240 bytes, "10 gb", in comic/grand-challenge.org app/config/settings.py; the algorithm image
# upload form sums the uploaded file sizes against it). Upload the weights as a model tarball instead
# (hnseg pack-model) to keep the image small.
GC_MAX_IMAGE_BYTES="${GC_MAX_IMAGE_BYTES:-10737418240}"

OUT="${OUT_DIR:-$SCRIPT_DIR}/${TAG//[\/:]/_}_$(date +%Y%m%d-%H%M%S).tar.gz"
PARTIAL="$OUT.partial"
trap 'rm -f "$PARTIAL"' EXIT
docker save "$TAG" | gzip -c >"$PARTIAL"
mv "$PARTIAL" "$OUT"
BYTES="$(stat -c %s "$OUT")"
echo "=+= wrote $OUT: $BYTES bytes ($((BYTES / 1048576)) MiB)"
if [ "$BYTES" -gt "$GC_MAX_IMAGE_BYTES" ]; then
  echo "=+= warning: $OUT is above grand-challenge's limit of $GC_MAX_IMAGE_BYTES bytes: it will be" \
       "refused; move the weights to a model tarball (hnseg pack-model)" >&2
fi
