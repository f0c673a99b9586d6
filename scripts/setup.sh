#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to build, test and demo corfs.
#
# Idempotent: a second run installs nothing and finishes in about a second.
#   - apt packages: `apt-get update` + install only when one is missing
#   - .venv: created once; `pip install -e '.[test]'` again only when pyproject.toml
#     changed since the last install (sha256 kept in .venv/.corfs-setup-stamp)
#   - /dev/fuse present (best effort), user_allow_other in /etc/fuse.conf
#
# Environment: PYTHON (interpreter for the venv, default python3), SETUP_VERBOSE=1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO/.venv"
STAMP="$VENV/.corfs-setup-stamp"
PYTHON=${PYTHON:-python3}
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config
  qemu-utils qemu-system-x86
  nginx-light fio attr busybox-static e2fsprogs cpio curl strace
  libvirt-daemon-system libvirt-clients
  prometheus
)

log() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, /dev/fuse, /etc/fuse.conf)"

is_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

# --- apt packages ------------------------------------------------------------------
# python3-venv is only needed when the chosen interpreter is Debian's and lacks ensurepip.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  APT_PACKAGES+=(python3-venv)
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- /dev/fuse and /etc/fuse.conf ---------------------------------------------------
if [[ ! -c /dev/fuse ]]; then
  log "/dev/fuse missing: trying modprobe fuse / mknod"
  modprobe fuse 2>/dev/null || true
  if [[ ! -c /dev/fuse ]]; then
    mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
  fi
  [[ -c /dev/fuse ]] || log "warning: /dev/fuse is still missing; FUSE tests will fail"
fi
if ! grep -qE '^[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf 2>/dev/null; then
  log "enabling user_allow_other in /etc/fuse.conf"
  echo user_allow_other >>/etc/fuse.conf
fi

# --- virtualenv ----------------------------------------------------------------------
if [[ -d $VENV ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "$VENV is broken (its interpreter does not run): recreating it"
  rm -rf "$VENV"
fi
if [[ ! -d $VENV ]]; then
  log "creating $VENV with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

want=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ $want != "$have" ]] || [[ ! -x $VENV/bin/pytest ]] || [[ ! -x $VENV/bin/ruff ]]; then
  log "installing corfs and its test dependencies into .venv"
  pip_quiet=-q
  [[ ${SETUP_VERBOSE:-} == 1 ]] && pip_quiet=
  "$VENV/bin/python" -m pip install $pip_quiet -e "$REPO[test]"
  echo "$want" >"$STAMP"
fi

log "ok"
