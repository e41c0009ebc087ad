#!/usr/bin/env bash
# Build (or reuse) the Kubernetes genq's tests run against, from the Go module beside this
# script (go.mod pins the versions): the control plane (etcd, kube-apiserver,
# kube-controller-manager, kubectl) and the node (kubelet, kube-scheduler, kube-proxy, and
# `pause`, the pod sandbox's process). Prints the folder holding the binaries.
#
#   tests/k8s/build-bins.sh              build once per machine, then a no-op
#   tests/k8s/build-bins.sh --print-dir  only print where the binaries live (or would)
#
# Everything is cached outside the clone, under ${GENQ_K8S_CACHE:-~/.cache/genq-k8s}:
#   <key>/bin/      the binaries; <key> hashes go.mod, go.sum, cmd/etcd, the Go version
#                   and BUILD_REV, so a version bump rebuilds and nothing else does
#   gomod/, gocache/  GOMODCACHE and GOCACHE, shared by every key, so a rebuild after a
#                   patch bump recompiles only what changed (copy the whole folder to warm
#                   another machine)
# Measured on 2 cores: a cold build of the control plane took ~8.5 min, the node's three
# binaries add ~3 min (plus ~20 s of module downloads); with
# a warm GOCACHE (same Go, same go.sum) it takes ~15 s, all linking; a hit is a no-op.
# Clean up with: GOMODCACHE=<cache>/gomod go clean -modcache; rm -rf <cache>.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"

# Bump when the flags below change, so cached binaries built the old way are not reused.
BUILD_REV=1
BINARIES=(etcd kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy pause)

CACHE="${GENQ_K8S_CACHE:-$HOME/.cache/genq-k8s}"
GO="${GO:-go}"
GOVERSION="$("$GO" env GOVERSION)"
KEY="$( (cat go.mod go.sum cmd/etcd/main.go cmd/pause/main.go; echo "$GOVERSION rev=$BUILD_REV") | sha256sum | cut -c1-16)"
OUT="$CACHE/$KEY"
BIN="$OUT/bin"

built() {
  [ -f "$OUT/.complete" ] || return 1
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

if [ "${1-}" = "--print-dir" ] || built; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$OUT" "$CACHE/gomod" "$CACHE/gocache"
# One build per key at a time (parallel CI jobs on one machine wait for the first).
exec 9>"$OUT/.lock"
flock 9
if built; then echo "$BIN"; exit 0; fi

# The Kubernetes version comes from go.mod, the one place it is written.
KUBE_VERSION="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' go.mod)"
[[ "$KUBE_VERSION" =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || { echo "cannot read k8s.io/kubernetes version from go.mod" >&2; exit 1; }
MINOR="${BASH_REMATCH[1]}"
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR"
  LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

export GOMODCACHE="$CACHE/gomod" GOCACHE="$CACHE/gocache"
# Static binaries like the release's; -trimpath keeps cache paths out of them and makes
# GOCACHE reusable from any checkout path; -mod=readonly: go.sum is the contract.
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath -buildvcs=false"

echo "== building ${BINARIES[*]} (Kubernetes $KUBE_VERSION, $GOVERSION) into $BIN" >&2
start=$SECONDS
rm -rf "$OUT/bin.tmp"
mkdir -p "$OUT/bin.tmp"
"$GO" build -ldflags "$LDFLAGS" -o "$OUT/bin.tmp/" \
  ./cmd/etcd ./cmd/pause \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-proxy
rm -rf "$BIN"
mv "$OUT/bin.tmp" "$BIN"
touch "$OUT/.complete"
echo "== built in $((SECONDS - start)) s" >&2
echo "$BIN"
