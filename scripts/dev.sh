#!/usr/bin/env bash
# localllm's test bed. On a fresh Debian machine it installs and starts what is
# missing (Docker engine, Python venv, the CPU llama-server image), then:
#   bash scripts/dev.sh demo     daemon up, a model served, a chat answered, status, clean stop
#   bash scripts/dev.sh test     the whole test suite (unit + integration on the real engine)
#   bash scripts/dev.sh bench    every benchmark, into bench/results/report.md and report.json
#   bash scripts/dev.sh setup    only the setup
# The compiled llama-server is cached in ${LOCALLLM_CACHE:-~/.cache/localllm}, keyed by version.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${LOCALLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localllm}
VENV=${LOCALLLM_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH:/usr/sbin:/sbin"

say() { printf '==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  say "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  command -v make >/dev/null || missing+=(make)
  command -v systemd-analyze >/dev/null || missing+=(systemd)  # the unit file is verified by a test
  command -v debootstrap >/dev/null || missing+=(debootstrap)  # the Debian base image of test_install.py
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v openssl >/dev/null || missing+=(openssl)  # the self-signed certificate of the TLS control tests
  command -v node >/dev/null || missing+=(nodejs)  # LibreChat's client stack (tests/integration/librechat_stack)
  command -v npm >/dev/null || missing+=(npm)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

ensure_engine() {
  docker info >/dev/null 2>&1 && return
  mkdir -p "$CACHE"
  say "starting dockerd (log: $CACHE/dockerd.log)"
  as_root sh -c "nohup dockerd --bridge=none --iptables=false >'$CACHE/dockerd.log' 2>&1 &"
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  say "dockerd did not come up within 60 s; see $CACHE/dockerd.log"; tail -20 "$CACHE/dockerd.log" >&2; exit 1
}

ensure_venv() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "Python 3.11 or newer is needed"; exit 1; }
  [ -x "$VENV/bin/python" ] || { say "creating the venv $VENV"; python3 -m venv "$VENV"; }
  say "installing localllm and its test dependencies into $VENV"
  mkdir -p "$CACHE"
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" >"$CACHE/pip.log" 2>&1; then
    tail -30 "$CACHE/pip.log" >&2; say "pip install failed; full log: $CACHE/pip.log"; exit 1
  fi
}

setup() {
  ensure_tools
  ensure_engine
  ensure_venv
  localllmctl image build
}

demo() {
  setup
  local state="$CACHE/demo" pid
  say "starting localllmd --demo (state in $state)"
  localllmd --demo --state-dir "$state" &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null || true' EXIT
  python "$ROOT/scripts/demo_chat.py" --socket "$state/control.sock"
  localllmctl --socket "$state/control.sock" status
  say "stopping localllmd (SIGTERM)"
  kill -TERM "$pid"
  wait "$pid"
  trap - EXIT
  left=$(docker ps -aq --filter label=io.localllm.owner=demo)
  [ -z "$left" ] || { say "containers left behind: $left"; exit 1; }
  say "demo done: localllmd stopped cleanly and left no container behind"
}

run_tests() {
  setup
  say "linting (ruff check, ruff format --check)"
  python -m ruff check "$ROOT/supervisor" "$ROOT/tests" "$ROOT/bench" "$ROOT/scripts"
  python -m ruff format --check "$ROOT/supervisor" "$ROOT/tests" "$ROOT/bench" "$ROOT/scripts"
  say "type-checking (mypy --strict on supervisor/core and supervisor/config)"
  python -m mypy  # its settings and files: [tool.mypy] in pyproject.toml
  say "running the test suite"
  python -m pytest "$@"
}

run_bench() {
  setup
  say "running the benchmarks (report: bench/results/report.md)"
  python -m bench.run "$@"
}

case "${1:-}" in
  demo) demo ;;
  test) shift; run_tests "$@" ;;
  bench) shift; run_bench "$@" ;;
  setup) setup ;;
  *) echo "usage: bash scripts/dev.sh demo|test [pytest args]|bench [--quick] [--only ...]|setup" >&2; exit 2 ;;
esac
