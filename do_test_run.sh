#!/usr/bin/env bash
# Run the image on one case as grand-challenge runs it, then check the output against the contract.
#   ./do_test_run.sh [CASE_DIR]   CASE_DIR holds images/ct/<file> and images/pet/<file>; without it, the demo case
#                                 (hnseg phantom --seed 1 --fov whole-body) is written to $WORK/demo-case once.
# Environment: TAG (image, default hnseg; build it first with ./do_build.sh), WORK (default ./test-run: the output
# and the run's stdout), PYTHON (default .venv/bin/python, which writes the phantom and checks the output),
# MODEL_DIR (an unpacked model tarball, mounted read-only at /opt/ml/model as grand-challenge mounts it; default
# none: the image's own weights/).
set -euo pipefail
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &>/dev/null && pwd)"
TAG="${TAG:-hnseg}"
WORK="${WORK:-$SCRIPT_DIR/test-run}"
PYTHON="${PYTHON:-$SCRIPT_DIR/.venv/bin/python}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

if [ $# -ge 1 ]; then
  CASE_DIR="$(cd "$1" && pwd)"
else
  CASE_DIR="$WORK/demo-case/input"
  [ -d "$CASE_DIR" ] || (cd "$SCRIPT_DIR" && "$PYTHON" -m hnseg_infer.cli.main phantom --seed 1 --fov whole-body \
    --out "$WORK/demo-case")
fi

# A fresh /output that the image's non-root user may write to (the templates' chmod o+rwx).
OUTPUT_DIR="$WORK/output"
rm -rf "$OUTPUT_DIR"
mkdir -m o+rwx "$OUTPUT_DIR"

# /tmp is a throwaway volume: writable, as on grand-challenge, but gone after the run.
TMP_VOLUME="hnseg-test-run-tmp-$$"
docker volume create "$TMP_VOLUME" >/dev/null
cleanup() {
  # The image's user owns what it wrote; open it to the host user (as the templates do) so that the next run
  # can remove it. Then drop the throwaway /tmp.
  docker run --rm --platform=linux/amd64 --quiet --volume "$OUTPUT_DIR":/output --entrypoint /bin/sh "$TAG" \
    -c "chmod -R -f o+rwX /output/* || true"
  docker volume rm "$TMP_VOLUME" >/dev/null
}
trap cleanup EXIT

GPU_ARGS=()
if nvidia-smi >/dev/null 2>&1; then GPU_ARGS=(--gpus all); fi
MODEL_ARGS=()
if [ -n "${MODEL_DIR:-}" ]; then MODEL_ARGS=(--volume "$(cd "$MODEL_DIR" && pwd)":/opt/ml/model:ro); fi

# The limits of the platform's templates (--shm-size 128m, --pids-limit 256, no capabilities, no network) and of
# HECKTOR 2025's runtime (16 GiB of memory, no swap beyond it); the input read-only, the image's user (not root).
echo "=+= running $TAG on $CASE_DIR"
START_NS="$(date +%s%N)"
set +e
docker run --rm \
  --platform=linux/amd64 \
  --network none \
  "${GPU_ARGS[@]}" \
  --memory 16g --memory-swap 16g \
  --shm-size 128m \
  --pids-limit 256 \
  --cap-drop ALL \
  --security-opt no-new-privileges \
  --user user \
  --volume "$CASE_DIR":/input:ro \
  --volume "$OUTPUT_DIR":/output \
  --volume "$TMP_VOLUME":/tmp \
  "${MODEL_ARGS[@]}" \
  "$TAG" | tee "$WORK/stdout.txt"
STATUS="${PIPESTATUS[0]}"
set -e
WALL_S="$(( ($(date +%s%N) - START_NS) / 1000000 ))"
printf '=+= docker run exited %s after %d.%03d s (wall, start-up included)\n' "$STATUS" \
  "$((WALL_S / 1000))" "$((WALL_S % 1000))"
echo "=+= summary: $(grep '^hnseg: ' "$WORK/stdout.txt" | tail -n 1 || true)"
[ "$STATUS" -eq 0 ] || exit "$STATUS"

(cd "$SCRIPT_DIR" && "$PYTHON" -m hnseg_infer.cli.main check-output --input "$CASE_DIR" --output "$OUTPUT_DIR")
