#!/usr/bin/env bash
# Install localllm on a GPU (or CPU) host from this checkout. Run as root; see --help.
#
# Idempotent: running it again upgrades the package in place, and never overwrites an existing
# /etc/localllm/config.yaml. What it makes:
#   /opt/localllm/venv                   an isolated venv holding the package (its import name
#                                        "supervisor" must not meet the supervisord package)
#   /opt/localllm/src                    the copy of the sources it was built from
#   /usr/local/bin/localllmctl, localllmd  links into the venv
#   /etc/localllm/config.yaml            written once by `localllmctl config init` (mode 0640, group localllm)
#   /var/lib/localllm                    the daemon's state and control sockets (mode 0751, owner localllm:
#                                        others may reach a socket by its name, and list nothing)
#   /etc/systemd/system/localllm.service enabled when systemd runs
#   system user and group "localllm"; the user is also in group "docker"
#   system groups "localllm-operators" and "localllm-viewers", given the operator and viewer control sockets
#   by the config that `localllmctl config init` writes; the user localllm is in both, to hand them out
set -euo pipefail

PREFIX=${LOCALLLM_PREFIX:-/opt/localllm}
ETC=${LOCALLLM_ETC:-/etc/localllm}
UNIT_DIR=${LOCALLLM_UNIT_DIR:-/etc/systemd/system}
BIN_DIR=${LOCALLLM_BIN_DIR:-/usr/local/bin}
PYTHON=${LOCALLLM_PYTHON:-python3}
STATE_DIR=/var/lib/localllm   # the unit's StateDirectory=localllm
ACCOUNT=localllm              # the unit's User= and Group=; its group is the admin socket's
ROLE_GROUPS=(localllm-operators localllm-viewers)  # the operator and viewer sockets' groups (config init)
VENV=$PREFIX/venv
CONFIG=$ETC/config.yaml
UNIT=$UNIT_DIR/localllm.service
LINKS=(localllmctl localllmd)

usage() {
  cat <<EOF
usage: sudo bash install.sh [--wheels DIR]
       sudo bash install.sh --uninstall [--purge]

Install localllm from this checkout (again: upgrade in place), its dependencies at the tested
versions pinned in scripts/requirements.lock:
  - system group and user "$ACCOUNT" (the user also in group "docker", made if missing), and the
    groups ${ROLE_GROUPS[*]} of the operator and viewer control sockets;
  - the package in an isolated venv $VENV, linked as $BIN_DIR/localllmctl and localllmd;
  - $CONFIG, written once by \`localllmctl config init\` with the detected hardware
    profile (mode 0640, group $ACCOUNT); an existing file is never overwritten;
  - the state directory $STATE_DIR (mode 0751, owner $ACCOUNT: the control sockets are in it);
  - $UNIT, enabled (not started) when systemd runs.

options:
  --wheels DIR   install offline: pip takes everything from the wheel directory DIR
                 (pip --no-index --find-links DIR); DIR needs the wheels of the locked versions
                 of the dependencies and of setuptools (the build backend), e.g. from
                 \`pip wheel -c scripts/requirements.lock -w DIR . setuptools\`
  --uninstall    stop and disable the service, remove the unit, the links and $PREFIX;
                 keep $CONFIG, $STATE_DIR, the user and group, and the models
  --purge        with --uninstall: also remove $ETC, $STATE_DIR, the user and the groups
  -h, --help     this help

environment (for packaging and tests; the defaults are the real paths):
  LOCALLLM_PREFIX (/opt/localllm), LOCALLLM_ETC (/etc/localllm),
  LOCALLLM_UNIT_DIR (/etc/systemd/system), LOCALLLM_BIN_DIR (/usr/local/bin), LOCALLLM_PYTHON (python3)
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
systemd_running() { [ -d /run/systemd/system ]; }

args=("$@")
mode=install
purge=0
wheels=
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "install.sh: --wheels needs a directory" >&2; exit 2; }; wheels=$2; shift ;;
    --wheels=*) wheels=${1#--wheels=} ;;
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$purge" = 1 ] && [ "$mode" != uninstall ]; then
  echo "install.sh: --purge goes with --uninstall" >&2; exit 2
fi
if [ -n "$wheels" ] && [ "$mode" = uninstall ]; then
  echo "install.sh: --wheels is for installing, not with --uninstall" >&2; exit 2
fi
[ "$(id -u)" = 0 ] || die "run as root: sudo bash install.sh ${args[*]}"
if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || die "--wheels $wheels: no such directory"
  wheels=$(cd "$wheels" && pwd -P)
fi

# A link of ours points into the venv; anything else at that path is left alone.
our_link() { [ -L "$BIN_DIR/$1" ] && [ "$(readlink "$BIN_DIR/$1")" = "$VENV/bin/$1" ]; }

install_accounts() {
  if ! getent group docker >/dev/null; then
    say "creating the system group docker (Docker's packages use it for the engine's socket)"
    groupadd --system docker
  fi
  local group
  for group in "$ACCOUNT" "${ROLE_GROUPS[@]}"; do
    if ! getent group "$group" >/dev/null; then
      say "creating the system group $group"
      groupadd --system "$group"
    fi
  done
  # The daemon gives each role's socket to that role's group: it must be a member of them.
  local groups=docker
  for group in "${ROLE_GROUPS[@]}"; do groups+=",$group"; done
  if ! id "$ACCOUNT" >/dev/null 2>&1; then
    say "creating the system user $ACCOUNT (groups $ACCOUNT, $groups)"
    useradd --system --gid "$ACCOUNT" --groups "$groups" --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "localllm daemon" "$ACCOUNT"
  else
    for group in docker "${ROLE_GROUPS[@]}"; do
      if ! id -nG "$ACCOUNT" | tr ' ' '\n' | grep -qx "$group"; then
        say "adding the user $ACCOUNT to the group $group"
        usermod -a -G "$group" "$ACCOUNT"
      fi
    done
    say "the user $ACCOUNT exists (groups: $(id -nG "$ACCOUNT"))"
  fi
}

copy_sources() {
  local src=$1 dest=$PREFIX/src
  if [ -d "$dest" ] && [ "$(cd "$src" && pwd -P)" = "$(cd "$dest" && pwd -P)" ]; then
    return  # install.sh of the installed copy: build from it as it is
  fi
  say "copying the sources to $dest"
  rm -rf "$dest.new"
  mkdir -p "$dest.new"
  # Not the checkout's venv, git data, build leftovers or models.
  tar -C "$src" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.mypy_cache --exclude=.hypothesis \
    --exclude='*.gguf' --anchored --exclude=./build --exclude=./dist -cf - . |
    tar -C "$dest.new" --no-same-owner -xf -
  rm -rf "$dest"
  mv "$dest.new" "$dest"
}

install_venv() {
  local src=$1 pip_opts=(-q --disable-pip-version-check --no-input)
  # The versions the tests ran on (bash scripts/dev.sh lock writes them): pip takes no other.
  [ -f "$src/scripts/requirements.lock" ] || die "$src/scripts/requirements.lock is missing: the checkout is incomplete"
  if [ -n "$wheels" ]; then
    pip_opts+=(--no-index --find-links "$wheels")
    say "installing offline, from the wheels in $wheels"
  fi
  mkdir -p "$PREFIX"
  copy_sources "$src"
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "updating the venv $VENV"
  else
    # No venv yet, or one whose Python has gone (a distribution upgrade): make it afresh.
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
      die "$PYTHON must be Python 3.11 or newer (set LOCALLLM_PYTHON to another interpreter)"
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
      die "$PYTHON cannot make a venv with pip: apt-get install python3-venv"
    say "creating the venv $VENV"
    "$PYTHON" -m venv --clear "$VENV"
  fi
  # A directory is always rebuilt and reinstalled, so an upgrade of the same version takes effect.
  say "installing the package and its dependencies into $VENV, at the versions of scripts/requirements.lock"
  "$VENV/bin/python" -m pip install "${pip_opts[@]}" --upgrade -c "$PREFIX/src/scripts/requirements.lock" "$PREFIX/src"
  rm -rf "$PREFIX/src/build" "$PREFIX/src/"*.egg-info
  local name
  mkdir -p "$BIN_DIR"
  for name in "${LINKS[@]}"; do
    if [ -e "$BIN_DIR/$name" ] && ! [ -L "$BIN_DIR/$name" ]; then
      warn "$BIN_DIR/$name exists and is not a link; leaving it (use $VENV/bin/$name)"
    else
      ln -sfn "$VENV/bin/$name" "$BIN_DIR/$name"
    fi
  done
  say "installed $("$VENV/bin/localllmd" --version); linked $BIN_DIR/localllmctl and $BIN_DIR/localllmd"
}

install_config() {
  mkdir -p "$ETC"
  if [ -e "$CONFIG" ]; then
    say "keeping the existing $CONFIG"
    return
  fi
  say "writing $CONFIG with the detected hardware profile"
  if ! (umask 027 && "$VENV/bin/localllmctl" config init --output "$CONFIG" --state-dir "$STATE_DIR"); then
    rm -f "$CONFIG"
    die "localllmctl config init failed; nothing was written to $CONFIG"
  fi
  chgrp "$ACCOUNT" "$CONFIG"
  chmod 0640 "$CONFIG"
}

install_unit() {
  local src=$1
  say "installing $UNIT"
  mkdir -p "$UNIT_DIR"
  # The unit names the default paths; follow LOCALLLM_PREFIX and LOCALLLM_ETC when they are set.
  sed -e "s|/opt/localllm/|$PREFIX/|g" -e "s|/etc/localllm/|$ETC/|g" "$src/systemd/localllm.service" >"$UNIT.new"
  chmod 0644 "$UNIT.new"
  mv "$UNIT.new" "$UNIT"
  if systemd_running; then
    systemctl daemon-reload
    systemctl enable localllm.service
    if systemctl is-active --quiet localllm.service; then
      say "localllm is running the previous version; run it anew with: systemctl restart localllm"
    fi
  fi
}

do_install() {
  local src
  src=$(cd "$(dirname "$0")" && pwd -P)
  if ! [ -f "$src/pyproject.toml" ] || ! [ -f "$src/systemd/localllm.service" ]; then
    die "$src is not a localllm checkout: run the install.sh that sits in one"
  fi
  command -v docker >/dev/null || warn "no docker client found; localllmd needs Docker Engine: apt-get install docker.io"
  install_accounts
  install_venv "$src"
  install_config
  # 0751: members of the role groups reach their sockets in it by name; they list and read nothing else.
  say "making the state directory $STATE_DIR"
  install -d -m 0751 -o "$ACCOUNT" -g "$ACCOUNT" "$STATE_DIR"
  install_unit "$src"
  say "done. Next:"
  echo "    edit the model catalog:  sudoedit $CONFIG"
  echo "    check it:                localllmctl config validate $CONFIG"
  if systemd_running; then
    echo "    start it:                systemctl start localllm     (then: localllmctl status)"
  else
    echo "    systemd is not running here; start the daemon by hand:"
    echo "        runuser -u $ACCOUNT -- $VENV/bin/localllmd --config $CONFIG"
  fi
  echo "    to use localllmctl without sudo, join the group of the role you need (then log in again):"
  echo "        viewer   (status, models, events, metrics, history):  usermod -a -G localllm-viewers ${SUDO_USER:-USER}"
  echo "        operator (also load and unload models):               usermod -a -G localllm-operators ${SUDO_USER:-USER}"
  echo "        admin    (also apply, rollback and logs):             usermod -a -G $ACCOUNT ${SUDO_USER:-USER}"
  echo "    WARNING: the group $ACCOUNT is admin on the control API, which drives Docker: a member can apply a"
  echo "    config that runs any local image or mounts host files. Treat it like the docker group (root on this"
  echo "    host); set daemon.policy to limit images, model paths and arguments. README: Security model."
}

do_uninstall() {
  local name kept=()
  if [ -f "$UNIT" ]; then
    if systemd_running; then
      say "stopping and disabling localllm.service (the daemon removes its containers as it stops)"
      systemctl disable --now localllm.service
    fi
    say "removing $UNIT"
    rm -f "$UNIT"
    if systemd_running; then systemctl daemon-reload; fi
  else
    say "no unit at $UNIT"
  fi
  for name in "${LINKS[@]}"; do
    if our_link "$name"; then
      say "removing the link $BIN_DIR/$name"
      rm -f "$BIN_DIR/$name"
    fi
  done
  if [ -d "$PREFIX" ]; then
    say "removing $VENV and $PREFIX/src"
    rm -rf "$VENV" "$PREFIX/src" "$PREFIX/src.new"
    if rmdir "$PREFIX" 2>/dev/null; then
      say "removed $PREFIX"
    else
      warn "kept $PREFIX: it holds other files ($(find "$PREFIX" -mindepth 1 -maxdepth 1 -printf '%f '))"
    fi
  else
    say "nothing at $PREFIX"
  fi
  if command -v docker >/dev/null; then
    local left
    left=$(timeout 10 docker ps -aq --filter label=io.localllm.owner 2>/dev/null || true)
    [ -z "$left" ] || warn "localllm's containers remain: docker ps -a --filter label=io.localllm.owner"
  fi
  if [ "$purge" = 1 ]; then
    say "purging $ETC and $STATE_DIR"
    rm -rf "$ETC" "$STATE_DIR"
    if id "$ACCOUNT" >/dev/null 2>&1; then
      say "removing the user $ACCOUNT"
      userdel "$ACCOUNT" || die "userdel $ACCOUNT failed: is a process of $ACCOUNT (localllmd) still running?"
    fi
    local group
    for group in "$ACCOUNT" "${ROLE_GROUPS[@]}"; do
      if getent group "$group" >/dev/null; then
        say "removing the group $group"
        groupdel "$group"
      fi
    done
    say "purged (the group docker and your models are left as they are)"
  else
    [ -e "$CONFIG" ] && kept+=("$CONFIG")
    [ -d "$STATE_DIR" ] && kept+=("$STATE_DIR")
    id "$ACCOUNT" >/dev/null 2>&1 && kept+=("the user and group $ACCOUNT")
    kept+=("the models")
    say "uninstalled; kept: $(printf '%s, ' "${kept[@]}" | sed 's/, $//')"
    echo "    remove those too with: bash install.sh --uninstall --purge"
  fi
}

if [ "$mode" = uninstall ]; then do_uninstall; else do_install; fi
