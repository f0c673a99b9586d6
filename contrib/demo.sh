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

step "corfs mount $BASE $CACHE $MNT"
corfs mount "$BASE" "$CACHE" "$MNT" 2>"$LOG" &
CORFS_PID=$!
for _ in $(seq 200); do
  mounted && break
  kill -0 "$CORFS_PID" 2>/dev/null || { echo "corfs mount exited early" >&2; wait "$CORFS_PID"; exit 1; }
  sleep 0.1
done
mounted || { echo "corfs did not mount $MNT within 20 s" >&2; exit 1; }
ls -l "$MNT"

step "read the whole image through the mount and compare with the base"
want=$(sha256sum <"$BASE/$IMAGE" | cut -d' ' -f1)
got=$(sha256sum <"$MNT/$IMAGE" | cut -d' ' -f1)
echo "base: $want"
echo "mnt:  $got"
[[ $want == "$got" ]] || { echo "MISMATCH" >&2; exit 1; }

step "write 64 KiB of 0xab at 1 MiB with qemu-io, then read it back"
qemu-io -f raw -c 'write -P 0xab 1M 64k' "$MNT/$IMAGE"
qemu-io -f raw -c 'read -P 0xab 1M 64k' "$MNT/$IMAGE"
cmp -s <(head -c 2M "$BASE/$IMAGE") <(head -c 2M "$MNT/$IMAGE") \
  && { echo "the write reached the base?!" >&2; exit 1; }
echo "the base is untouched: $(sha256sum <"$BASE/$IMAGE" | cut -d' ' -f1)"

step "corfs status $MNT"
corfs status "$MNT"

step "waiting for background streaming to finish (up to ${TIMEOUT} s)"
# The JSON schema belongs to the CLI; accept the usual ways of saying "complete".
is_complete='
import json, sys
doc = json.load(sys.stdin)
def images(d):
    imgs = d.get("images", d) if isinstance(d, dict) else d
    return list(imgs.values()) if isinstance(imgs, dict) else list(imgs)
def done(i):
    if not isinstance(i, dict):
        return False
    for key in ("complete", "is_complete", "fully_local"):
        if key in i:
            return bool(i[key])
    if str(i.get("state", "")).lower() in ("complete", "done", "local"):
        return True
    for a, b in (("chunks_local", "chunks_total"), ("local_chunks", "total_chunks"),
                 ("bytes_local", "size"), ("local_bytes", "size")):
        if a in i and b in i:
            return i[a] >= i[b] > 0
    return False
imgs = images(doc)
sys.exit(0 if imgs and all(done(i) for i in imgs) else 1)
'
deadline=$((SECONDS + TIMEOUT))
until corfs status "$MNT" --json | "$PY" -c "$is_complete"; do
  if ((SECONDS >= deadline)); then
    echo "streaming did not complete within ${TIMEOUT} s; last status:" >&2
    corfs status "$MNT" --json >&2 || true
    exit 1
  fi
  sleep 0.5
done
echo "complete"
corfs status "$MNT"

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
