#!/usr/bin/env bash
# Build (or reuse) the helm binary the chart tests run (tests/test_chart*.py): helm from
# its Go module, pinned by go.mod beside this script (no release binary can be downloaded
# here). Prints the path of the binary.
#
#   tests/helm/build-helm.sh              build once per machine, then a no-op
#   tests/helm/build-helm.sh --print-path only print where the binary lives (or would)
#
# Cached outside the clone, under ${GENQ_HELM_CACHE:-~/.cache/genq-helm}:
#   <key>/helm        the binary; <key> hashes go.mod, go.sum, the Go version and
#                     BUILD_REV, so a version bump rebuilds and nothing else does
#   gomod/, gocache/  GOMODCACHE and GOCACHE, shared by every key
# Measured on 2 cores: a cold build (empty GOMODCACHE and GOCACHE) took 894 s wall on a
# machine shared with other builds (load average ~15), 4 min 42 s user + 1 min 23 s sys CPU,
# so ~3-4 min on an idle machine; a hit is a no-op. To move to a new helm:
#   cd tests/helm && go get -tool helm.sh/helm/v4/cmd/helm@vX.Y.Z && go mod tidy
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"

# Bump when the flags below change, so a binary built the old way is not reused.
BUILD_REV=1

CACHE="${GENQ_HELM_CACHE:-$HOME/.cache/genq-helm}"
GO="${GO:-go}"
GOVERSION="$("$GO" env GOVERSION)"
KEY="$( (cat go.mod go.sum; echo "$GOVERSION rev=$BUILD_REV") | sha256sum | cut -c1-16)"
OUT="$CACHE/$KEY"
HELM="$OUT/helm"

if [ "${1-}" = "--print-path" ] || { [ -f "$OUT/.complete" ] && [ -x "$HELM" ]; }; then
  echo "$HELM"
  exit 0
fi

mkdir -p "$OUT" "$CACHE/gomod" "$CACHE/gocache"
# One build per key at a time (parallel CI jobs on one machine wait for the first).
exec 9>"$OUT/.lock"
flock 9
if [ -f "$OUT/.complete" ] && [ -x "$HELM" ]; then echo "$HELM"; exit 0; fi

# The helm version comes from go.mod, the one place it is written; stamped the way helm's
# Makefile does (`helm version` shows it; the Kubernetes version helm assumes for
# `helm template` comes from the client-go module in the build info).
HELM_VERSION="$(awk '$1 == "helm.sh/helm/v4" {print $2; exit}' go.mod)"
[[ "$HELM_VERSION" =~ ^v4\.[0-9]+\.[0-9]+$ ]] || { echo "cannot read helm.sh/helm/v4 version from go.mod" >&2; exit 1; }
LDFLAGS="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
LDFLAGS+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

export GOMODCACHE="$CACHE/gomod" GOCACHE="$CACHE/gocache"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath -buildvcs=false"

echo "== building helm $HELM_VERSION ($GOVERSION) into $OUT" >&2
start=$SECONDS
"$GO" build -ldflags "$LDFLAGS" -o "$OUT/helm.tmp" helm.sh/helm/v4/cmd/helm
mv "$OUT/helm.tmp" "$HELM"
touch "$OUT/.complete"
echo "== built in $((SECONDS - start)) s" >&2
echo "$HELM"
