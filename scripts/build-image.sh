#!/usr/bin/env bash
# Build a python:3.11-compatible Docker image OFFLINE (no container registry):
# debootstrap a minimal Debian bookworm rootfs from the apt mirror this machine
# already uses, then `docker import` it. bookworm's python3 is 3.11.
#
# Usage: scripts/build-image.sh [--force] [TAG]     (default TAG: python:3.11)
# Idempotent: exits 0 without doing anything if TAG already exists (unless --force).
set -euo pipefail

TAG="python:3.11"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) FORCE=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        -*) echo "build-image: unknown option: $arg" >&2; exit 2 ;;
        *) TAG="$arg" ;;
    esac
done

SUITE=bookworm
DEFAULT_MIRROR=http://deb.debian.org/debian

log() { echo "build-image: $*" >&2; }

image_exists() { docker image inspect "$TAG" >/dev/null 2>&1; }

if [[ $FORCE -eq 0 ]] && image_exists; then
    echo "build-image: image $TAG already exists, skipping (use --force to rebuild)"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    log "must run as root (debootstrap needs it)"; exit 1
fi
for cmd in debootstrap docker tar; do
    command -v "$cmd" >/dev/null || { log "missing required command: $cmd"; exit 1; }
done

# Serialize concurrent builds (e.g. two CI steps racing) so they don't both
# debootstrap; re-check for the image once we hold the lock.
exec 9>/var/lock/aviato-build-image.lock
flock 9
if [[ $FORCE -eq 0 ]] && image_exists; then
    echo "build-image: image $TAG appeared while waiting for lock, skipping"
    exit 0
fi

# Find the Debian mirror apt is configured with (no internet besides it), so
# debootstrap works here. Handles both deb822 *.sources and one-line *.list;
# picks the entry that serves plain "bookworm" (not -security / -updates).
find_mirror() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        awk -v suite="$SUITE" '
            function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uri != "" && !done) { print uri; done=1 } types=""; suites=""; uri="" }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            tolower($1) == "types:"  { $1=""; types=$0 }
            tolower($1) == "suites:" { $1=""; suites=$0 }
            tolower($1) == "uris:"   { uri=$2 }
            END { flush() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        # deb [opts] URI suite components...
        sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2 }'
    done
    shopt -u nullglob
}
MIRROR="$(find_mirror | head -n1 || true)"
MIRROR="${MIRROR:-$DEFAULT_MIRROR}"
MIRROR="${MIRROR%/}"

START=$(date +%s)
# /var/tmp rather than /tmp: /tmp is often a nodev/noexec tmpfs, which breaks debootstrap.
WORKDIR="$(mktemp -d "${AVIATO_BUILD_TMPDIR:-/var/tmp}/aviato-image.XXXXXX")"
ROOTDIR="$WORKDIR/rootfs"

cleanup() {
    # debootstrap mounts proc/sys inside the target; if it was interrupted they
    # may still be mounted, and rm -rf must never descend into them.
    local m
    if [[ -d $ROOTDIR ]]; then
        for m in $(awk -v r="$ROOTDIR" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
            umount -l "$m" 2>/dev/null || true
        done
    fi
    rm -rf --one-file-system "$WORKDIR"
}
trap cleanup EXIT

log "debootstrap $SUITE from $MIRROR into $ROOTDIR"
debootstrap --variant=minbase --include=python3,python-is-python3,ca-certificates \
    "$SUITE" "$ROOTDIR" "$MIRROR" >"$WORKDIR/debootstrap.log" 2>&1 || {
    log "debootstrap failed; last lines of its log:"; tail -n 30 "$WORKDIR/debootstrap.log" >&2
    [[ -f $ROOTDIR/debootstrap/debootstrap.log ]] && tail -n 30 "$ROOTDIR/debootstrap/debootstrap.log" >&2
    exit 1
}

# The official python image has its interpreter in /usr/local/bin; some code
# and tests spell that path out, so mirror it with symlinks to Debian's python.
PYVER="$(basename "$(readlink -f "$ROOTDIR/usr/bin/python3")")"   # e.g. python3.11
if [[ $PYVER != python3.11 ]]; then
    log "expected python3.11 in the $SUITE rootfs, got $PYVER"; exit 1
fi
mkdir -p "$ROOTDIR/usr/local/bin"
ln -sfn "/usr/bin/$PYVER" "$ROOTDIR/usr/local/bin/$PYVER"
ln -sfn "$PYVER" "$ROOTDIR/usr/local/bin/python3"
ln -sfn python3 "$ROOTDIR/usr/local/bin/python"

# Point the image's apt at the same mirror so `apt-get install` works inside it here.
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTDIR/etc/apt/sources.list"

# Keep the image small: drop apt caches/lists, docs, man pages, logs.
rm -rf "$ROOTDIR"/var/cache/apt/archives/*.deb "$ROOTDIR"/var/cache/apt/*.bin \
       "$ROOTDIR"/var/lib/apt/lists/* "$ROOTDIR"/var/cache/debconf/*-old \
       "$ROOTDIR"/usr/share/doc/* "$ROOTDIR"/usr/share/man/* "$ROOTDIR"/usr/share/info/* \
       "$ROOTDIR"/var/log/*.log "$ROOTDIR"/var/log/apt/* "$ROOTDIR"/debootstrap
find "$ROOTDIR/usr/lib" -name '__pycache__' -type d -prune -exec rm -rf {} +
# Docker supplies /dev and /proc at run time.
rm -rf "${ROOTDIR:?}"/dev/* "${ROOTDIR:?}"/proc/* "${ROOTDIR:?}"/sys/*

OLD_ID="$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)"
log "importing rootfs as $TAG"
tar --numeric-owner -C "$ROOTDIR" -c . | docker import \
    --change 'CMD ["python3"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    - "$TAG" >/dev/null

# Verify it behaves like python:3.11 for our purposes; untag a bad image so a
# later run rebuilds instead of skipping.
verify() {
    local out
    out="$(docker run --rm "$TAG" python --version 2>&1)"
    [[ $out == "Python 3.11."* ]] || { log "python --version printed: $out"; return 1; }
    docker run --rm "$TAG" sh -c '
        for c in python python3 python3.11 sleep echo cat sh timeout true; do
            command -v "$c" >/dev/null || { echo "missing in image: $c" >&2; exit 1; }
        done
        [ "$(command -v python3)" = /usr/local/bin/python3 ] || { echo "python3 not in /usr/local/bin" >&2; exit 1; }'
}
if ! verify; then
    log "verification of $TAG failed; removing it"
    docker rmi "$TAG" >/dev/null 2>&1 || true
    exit 1
fi

# With --force the previous image is now untagged; drop it if nothing uses it.
NEW_ID="$(docker image inspect -f '{{.Id}}' "$TAG")"
if [[ -n $OLD_ID && $OLD_ID != "$NEW_ID" ]]; then
    docker rmi "$OLD_ID" >/dev/null 2>&1 || true
fi

echo "build-image: built $TAG ($(docker run --rm "$TAG" python --version 2>&1)) in $(( $(date +%s) - START ))s"
