#!/usr/bin/env bash
# Install localllm on a GPU (or CPU) host. Idempotent: running it again upgrades in place
# and never overwrites /etc/localllm/config.yaml.
#   sudo bash install.sh            install from this checkout
# Layout: /opt/localllm/venv (the package), /etc/localllm/config.yaml, /var/lib/localllm (state),
# /etc/systemd/system/localllm.service, system user and group "localllm" (member of "docker").
set -euo pipefail
cd "$(dirname "$0")"
SRC=$PWD
PREFIX=${LOCALLLM_PREFIX:-/opt/localllm}
ETC=${LOCALLLM_ETC:-/etc/localllm}
UNIT_DIR=${LOCALLLM_UNIT_DIR:-/etc/systemd/system}

say() { printf '==> %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo bash install.sh)" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "install.sh: Python 3.11+ needed" >&2; exit 1; }
command -v docker >/dev/null || echo "install.sh: warning: no docker client found; install Docker Engine first" >&2

getent group docker >/dev/null || { say "creating group docker"; groupadd --system docker; }
getent group localllm >/dev/null || { say "creating group localllm"; groupadd --system localllm; }
if ! id localllm >/dev/null 2>&1; then
  say "creating user localllm"
  useradd --system --gid localllm --groups docker --home-dir /var/lib/localllm --shell /usr/sbin/nologin localllm
else
  usermod -a -G docker localllm
fi

say "installing the package into $PREFIX/venv"
mkdir -p "$PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$SRC"
ln -sf "$PREFIX/venv/bin/localllmctl" /usr/local/bin/localllmctl

mkdir -p "$ETC"
if [ ! -f "$ETC/config.yaml" ]; then
  say "writing $ETC/config.yaml from the example: edit the model catalog"
  install -m 0640 -g localllm systemd/config.example.yaml "$ETC/config.yaml"
else
  say "keeping the existing $ETC/config.yaml"
fi
install -d -m 0750 -o localllm -g localllm /var/lib/localllm

say "installing $UNIT_DIR/localllm.service"
install -m 0644 systemd/localllm.service "$UNIT_DIR/localllm.service"
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable localllm.service
  say "enabled; start with: systemctl start localllm   (check: localllmctl status)"
else
  say "systemd is not running here: start by hand with $PREFIX/venv/bin/localllmd --config $ETC/config.yaml"
fi
