#!/usr/bin/env bash
# corfs in one minute: mount a 64 MiB image from a local-directory base, read it, write
# through it with qemu-io, watch it stream to completion, unmount, look at the cache.
#
# Run from the repo after `make setup` (or just `make demo`). Everything lives in a temp dir
# that is removed at the end; only the corfs process started here is stopped.
# Environment: PYTHON (default .venv/bin/python), DEMO_TIMEOUT (seconds to wait for streaming).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
TIMEOUT=${DEMO_TIMEOUT:-120}

WORK=$(mktemp -d /tmp/corfs-demo.XXXXXX)
BASE=$WORK/base CACHE=$WORK/cache MNT=$WORK/mnt LOG=$WORK/corfs.log
IMAGE=disk.raw
CORFS_PID=

corfs() { "$PY" -m corfs "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Is MNT in the mount table? Never stats MNT itself: a dead FUSE mount would hang or fail.
mounted() { awk -v m="$MNT" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if mounted; then fusermount3 -u -z "$MNT" 2>/dev/null || true; fi
  if [[ -n $CORFS_PID ]] && kill -0 "$CORFS_PID" 2>/dev/null; then
    kill -TERM "$CORFS_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$CORFS_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$CORFS_PID" 2>/dev/null || true
  fi
  if ((rc != 0)) && [[ -s $LOG ]]; then
    echo "--- last lines of the corfs log ($LOG) ---" >&2
    tail -n 30 "$LOG" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$BASE" "$CACHE" "$MNT"

step "a 64 MiB base image in $BASE (random data with runs of zeros between)"
truncate -s 64M "$BASE/$IMAGE"
for at_mib in 0 8 24 40 56; do  # 4 MiB of random data at each; the rest reads as zeros
  head -c 4M /dev/urandom | dd of="$BASE/$IMAGE" bs=1M seek="$at_mib" conv=notrunc status=none
done
ls -ls "$BASE"

step "corfs mount $BASE $CACHE $MNT --bandwidth 8M   (streaming held at 8 MiB/s for the demo)"
corfs mount "$BASE" "$CACHE" "$MNT" --bandwidth 8M 2>"$LOG" &
CORFS_PID=$!
for _ in $(seq 200); do
  mounted && break
  kill -0 "$CORFS_PID" 2>/dev/null || { echo "corfs mount exited early" >&2; wait "$CORFS_PID"; exit 1; }
  sleep 0.1
done
mounted || { echo "corfs did not mount $MNT within 20 s" >&2; exit 1; }
ls -l "$MNT"

step "copy-on-read: read 4 MiB at 40 MiB through the mount and compare with the base"
cmp <(dd if="$BASE/$IMAGE" bs=1M skip=40 count=4 status=none) \
    <(dd if="$MNT/$IMAGE" bs=1M skip=40 count=4 status=none) && echo "same bytes"

step "write 64 KiB of 0xab at 1 MiB with qemu-io, then read it back"
qemu-io -f raw -c 'write -P 0xab 1M 64k' "$MNT/$IMAGE"
qemu-io -f raw -c 'read -P 0xab 1M 64k' "$MNT/$IMAGE"
cmp -s <(head -c 2M "$BASE/$IMAGE") <(head -c 2M "$MNT/$IMAGE") \
  && { echo "the write reached the base?!" >&2; exit 1; }
echo "the base is untouched: $(sha256sum <"$BASE/$IMAGE" | cut -d' ' -f1)"

step "corfs status $MNT   (streaming in the background)"
sleep 1
corfs status "$MNT"

step "corfs stream bandwidth $MNT 0   (lift the limit) and wait until the image is complete"
corfs stream bandwidth "$MNT" 0
deadline=$((SECONDS + TIMEOUT))
until corfs status "$MNT" --json | "$PY" -c \
    'import json, sys; sys.exit(any(i["state"] != "complete" for i in json.load(sys.stdin)["images"]))'; do
  if ((SECONDS >= deadline)); then
    echo "streaming did not complete within ${TIMEOUT} s; last status:" >&2
    corfs status "$MNT" --json >&2 || true
    exit 1
  fi
  sleep 0.5
done
corfs status "$MNT"

step "every byte: the mount equals the base plus the one write"
cp --sparse=always "$BASE/$IMAGE" "$WORK/expected.raw"
qemu-io -f raw -c 'write -P 0xab 1M 64k' "$WORK/expected.raw" >/dev/null
want=$(sha256sum <"$WORK/expected.raw" | cut -d' ' -f1)
got=$(sha256sum <"$MNT/$IMAGE" | cut -d' ' -f1)
echo "expected: $want"
echo "mnt:      $got"
[[ $want == "$got" ]] || { echo "MISMATCH" >&2; exit 1; }

step "fusermount3 -u $MNT"
fusermount3 -u "$MNT"
for _ in $(seq 200); do kill -0 "$CORFS_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$CORFS_PID" 2>/dev/null; then
  echo "corfs still running 20 s after unmount" >&2
  exit 1
fi
wait "$CORFS_PID" || { echo "corfs exited with code $?" >&2; exit 1; }
CORFS_PID=

step "corfs status $CACHE (offline, from the cache dir)"
corfs status "$CACHE"
du -sh --apparent-size "$CACHE"; du -sh "$CACHE"

step "done: the demo's temp dir is removed on exit"
