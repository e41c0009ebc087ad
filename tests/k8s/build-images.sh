#!/usr/bin/env bash
# Build (or reuse) the container images the test node runs, with buildah (no Docker
# engine here) from the project's own Dockerfiles, on a Python base made from Debian's
# packages (no registry is reachable). Prints one line per image: NAME REF ARCHIVE, where
# ARCHIVE is an OCI archive that tests/k8s/node.py imports into the node's containerd.
#
#   pause        localhost/genq-pause:<key>     the pod sandbox (tests/k8s/cmd/pause)
#   api          localhost/genq-api:<key>       docker/api.Dockerfile
#   operator     localhost/genq-operator:<key>  docker/operator.Dockerfile
#   worker-test  localhost/genq-worker-test:<key>  docker/worker.Dockerfile with EXTRAS=""
#                (no torch: python tools, Lanczos upscale) plus tests/genq_testtools.py
#
# Each <key> hashes what defines the image (its Dockerfile, pyproject.toml, the package
# sources, the base), so an unchanged image is neither rebuilt nor imported again. Cached
# outside the clone under ${GENQ_NODE_CACHE:-~/.cache/genq-node}/images; buildah's own
# storage keeps the layers (a source-only change rebuilds only the last layers).
# Measured on 2 cores, cold: base ~50 s (debootstrap), api ~40 s, operator ~10 s, worker
# ~40 s; a hit is a no-op.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"

CACHE="${GENQ_NODE_CACHE:-$HOME/.cache/genq-node}/images"
# Outbound TLS may be intercepted on build machines: pip inside a build step trusts the
# host's CA bundle, mounted for the build only (never baked into an image).
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# Bump when the base recipe below changes.
BASE_REV=3
SUITE=bookworm

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-images.sh: $tool is missing (apt-get install buildah debootstrap)" >&2; exit 1; }
done
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

hash_of() { sha256sum | cut -c1-16; }
tree_hash() {  # the content of files under the given paths, in a stable order
  find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | hash_of
}
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
archive() {  # archive NAME REF: write the OCI archive once, print the line
  local name="$1" ref="$2" tar="$CACHE/$1-${2##*:}.tar"
  if [ ! -f "$tar" ]; then
    buildah push -q "$ref" "oci-archive:$tar.tmp:$ref" >/dev/null
    mv "$tar.tmp" "$tar"
    # Older archives of this image are never imported again.
    find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "${tar##*/}" -delete
  fi
  echo "$name $ref $tar"
}
bud() {  # bud REF DOCKERFILE CONTEXT [ARGS...]
  local ref="$1" file="$2" context="$3"; shift 3
  echo "== buildah bud $ref" >&2
  buildah bud -q --pull=false --network host --layers --isolation chroot \
    -v "$CA_BUNDLE:$CA_BUNDLE:ro" -f "$file" -t "$ref" "$@" "$context" >&2
}

# -- the Python base: Debian's python3 (3.11) and passwd (the Dockerfiles add a user), as
#    python:3.12-slim has them -----------------------------------------------------------
BASE="localhost/genq-python-base:$(echo "$SUITE rev=$BASE_REV" | hash_of)"
if ! have_image "$BASE"; then
  echo "== debootstrap $SUITE (python3)" >&2
  rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd "$SUITE" "$rootfs" "${mirror:-http://deb.debian.org/debian}" >&2
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  ctr=$(buildah from scratch)
  buildah copy "$ctr" "$rootfs" / >/dev/null
  buildah config --cmd '["python3"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit -q "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

# -- pause: the sandbox process, built by build-bins.sh ------------------------------------
BINS="$("$HERE/build-bins.sh")"
PAUSE="localhost/genq-pause:$(hash_of < "$BINS/pause")"
if ! have_image "$PAUSE"; then
  ctr=$(buildah from scratch)
  buildah copy "$ctr" "$BINS/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  buildah commit -q "$ctr" "$PAUSE" >/dev/null
  buildah rm "$ctr" >/dev/null
fi
archive pause "$PAUSE"

# -- genq's images ---------------------------------------------------------------------------
SOURCES="$(tree_hash pyproject.toml README.md src api operator worker)"
for name in api operator; do
  ref="localhost/genq-$name:$( (cat "docker/$name.Dockerfile"; echo "$SOURCES $BASE") | hash_of)"
  have_image "$ref" || bud "$ref" "docker/$name.Dockerfile" . --build-arg "PYTHON_IMAGE=$BASE"
  archive "$name" "$ref"
done

worker="localhost/genq-worker-cpu:$( (cat docker/worker.Dockerfile; echo "$SOURCES $BASE") | hash_of)"
have_image "$worker" || bud "$worker" docker/worker.Dockerfile . --build-arg "PYTHON_IMAGE=$BASE" --build-arg EXTRAS=
ref="localhost/genq-worker-test:$( (cat tests/k8s/worker-test.Dockerfile tests/genq_testtools.py; echo "$worker") | hash_of)"
# Its context is tests/ (the repository's .dockerignore lets only the package in).
have_image "$ref" || bud "$ref" tests/k8s/worker-test.Dockerfile tests --build-arg "WORKER_IMAGE=$worker"
archive worker-test "$ref"
