#!/usr/bin/env bash
# Build the grand-challenge image from the Dockerfile, as the algorithm templates' do_build.sh does.
#   ./do_build.sh [TAG]     TAG defaults to hnseg
# Not run in this repository's CI: Docker does not run on the development machine (test/test_scripts.py runs
# this script against a stand-in docker that records its arguments).
set -euo pipefail
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &>/dev/null && pwd)"
TAG="${1:-hnseg}"

# linux/amd64: grand-challenge runs amd64 machines (a build on an ARM host would not start there).
docker build --platform=linux/amd64 --tag "$TAG" "$SCRIPT_DIR"
echo "=+= built $TAG"
