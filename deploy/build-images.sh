#!/usr/bin/env bash
# Build the image mmiosplit:dev (both services and the client) from this checkout, with no network in the build.
#
#   deploy/build-images.sh                 # FROM python:3.11-slim (pulled by the engine if it is not there)
#   deploy/build-images.sh --local-base    # FROM a Debian 12 base made here with debootstrap (no registry needed)
#
# Options:
#   --local-base        make (once) and use mmiosplit-base:bookworm: debootstrap --variant=minbase with python3,
#                       python3-venv and ca-certificates, from the Debian mirror apt already uses, then docker import
#   --rebuild-base      with --local-base: make the base again even if the image exists
#   --base-image IMAGE  build FROM this image instead (it needs python3 with the venv module)
#   --tag TAG           the image to build (default mmiosplit:dev)
#   --mirror URL        with --local-base: the Debian mirror (default: the one in apt's sources)
#
# Steps: wheels for this project and its dependencies are built on the host (pip wheel . -w build/wheelhouse,
# with the host's pip and its index settings), because pip inside `docker build` may reach no index; the
# Dockerfile installs them with --no-index. The wheels must suit the image's Python, so the host's Python
# (PYTHON, default python3) must have the base image's major.minor version; this is checked.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TAG="mmiosplit:dev"
BASE_IMAGE="python:3.11-slim"
LOCAL_BASE_TAG="mmiosplit-base:bookworm"
LOCAL_BASE=0
REBUILD_BASE=0
MIRROR="${MIRROR:-}"
BASE_GIVEN=0

die() {
  echo "build-images.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) LOCAL_BASE=1 ;;
    --rebuild-base) REBUILD_BASE=1 ;;
    --base-image)
      [ $# -ge 2 ] || die "--base-image needs an image name"
      BASE_IMAGE="$2"; BASE_GIVEN=1; shift ;;
    --tag)
      [ $# -ge 2 ] || die "--tag needs an image name, e.g. mmiosplit:dev"
      TAG="$2"; shift ;;
    --mirror)
      [ $# -ge 2 ] || die "--mirror needs a URL"
      MIRROR="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
if [ "$LOCAL_BASE" -eq 1 ] && [ "$BASE_GIVEN" -eq 1 ]; then
  die "--local-base and --base-image both choose the base image; give one of them"
fi
if [ "$REBUILD_BASE" -eq 1 ] && [ "$LOCAL_BASE" -eq 0 ]; then
  die "--rebuild-base only makes sense with --local-base"
fi

command -v docker >/dev/null 2>&1 || die "no docker client on PATH (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info' (start dockerd, or run deploy/smoke.sh, which starts one)"

# The Debian mirror apt uses on this machine: the first URI of a deb source for bookworm (deb822 .sources files
# first, then the one-line sources.list format). Nothing is hard-coded, so the script follows the machine's setup.
apt_mirror() {
  local file
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    awk '
      function flush() { if (deb && suite && uri != "") { print uri; found = 1; exit } deb = 0; suite = 0; uri = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^[[:space:]]*#/ { next }
      tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite = 1 }
      tolower($1) == "uris:" { uri = $2 }
      END { if (!found) flush() }
    ' "$file" | head -n 1
  done
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$file" ] || continue
    # deb [options] URI bookworm components...
    awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == "bookworm") { print $i; exit } }' "$file"
  done
}

make_local_base() {
  if [ "$REBUILD_BASE" -eq 0 ] && docker image inspect "$LOCAL_BASE_TAG" >/dev/null 2>&1; then
    echo "== base: $LOCAL_BASE_TAG exists (--rebuild-base to make it again)"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "--local-base runs debootstrap, which needs root"
  command -v debootstrap >/dev/null 2>&1 || die "--local-base needs debootstrap (apt-get install debootstrap)"
  if [ -z "$MIRROR" ]; then
    MIRROR="$(apt_mirror | head -n 1)"
    [ -n "$MIRROR" ] || die "no Debian bookworm mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/; give --mirror URL"
  fi
  local work
  work="$(mktemp -d "${TMPDIR:-/tmp}/mmiosplit-base.XXXXXX")"
  # shellcheck disable=SC2064  # expand $work now: the trap runs after this function's locals are gone
  trap "rm -rf '$work'" EXIT
  echo "== base: debootstrap bookworm (minbase, python3, python3-venv) into $work/rootfs"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" \
      "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above); the mirror was taken from apt's sources (--mirror URL to choose another)"
  fi
  # What a container never needs: apt's lists and caches, logs.
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/cache/apt/archives/"*.deb \
    "$work/rootfs/var/log/"*.log
  echo "== base: docker import as $LOCAL_BASE_TAG"
  tar -C "$work/rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$LOCAL_BASE_TAG" >/dev/null
  rm -rf "$work"
  trap - EXIT
}

if [ "$LOCAL_BASE" -eq 1 ]; then
  make_local_base
  BASE_IMAGE="$LOCAL_BASE_TAG"
elif ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "== base: pulling $BASE_IMAGE"
  docker pull "$BASE_IMAGE" >/dev/null || die "cannot pull $BASE_IMAGE (no registry reachable?); use --local-base"
fi

# The wheels must be for the base's Python: compare major.minor with the host interpreter that builds them.
base_py="$(docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" -c \
  'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
  || die "$BASE_IMAGE has no python3 to run"
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON on PATH to build the wheels (set PYTHON=python$base_py)"
host_py="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$host_py" != "$base_py" ]; then
  die "the wheels would be built by Python $host_py ($PYTHON) but $BASE_IMAGE runs Python $base_py; set PYTHON to a Python $base_py"
fi

echo "== wheelhouse: $PYTHON -m pip wheel . (Python $host_py) into build/wheelhouse"
rm -rf "$ROOT/build/wheelhouse"
mkdir -p "$ROOT/build/wheelhouse/deps" "$ROOT/build/wheelhouse/project"
# A fixed timestamp makes the project's wheel the same bytes when nothing changed, so the image's layers cache.
if ! (cd "$ROOT" && SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || echo 315532800)" \
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check . -w build/wheelhouse/deps) >"$ROOT/build/wheelhouse.log" 2>&1; then
  tail -n 30 "$ROOT/build/wheelhouse.log" >&2
  die "pip wheel failed (log above, in build/wheelhouse.log)"
fi
# The Dockerfile installs deps/ and project/ in separate layers, so a change to mmiosplit reuses the first.
mv "$ROOT"/build/wheelhouse/deps/mmiosplit-*.whl "$ROOT/build/wheelhouse/project/" 2>/dev/null \
  || die "pip wheel made no mmiosplit wheel (see build/wheelhouse.log)"

echo "== image: $TAG FROM $BASE_IMAGE (docker build --network none)"
docker build --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$ROOT/deploy/Dockerfile" -t "$TAG" "$ROOT" \
  || die "docker build failed (output above)"
echo "== built $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
