#!/usr/bin/env bash
# localllm's test bed. On a fresh Debian machine it installs and starts what is
# missing (Docker engine, Python venv, the CPU llama-server image), then:
#   bash scripts/dev.sh demo     daemon up, a model served, a chat answered, status, clean stop
#   bash scripts/dev.sh test     the whole test suite (unit + integration on the real engine)
#   bash scripts/dev.sh bench    every benchmark, into bench/results/report.md and report.json
#   bash scripts/dev.sh setup    only the setup
#   bash scripts/dev.sh lock     refresh scripts/requirements.lock, the pinned versions that the venv and install.sh get
# The compiled llama-server is cached in ${LOCALLLM_CACHE:-~/.cache/localllm}, keyed by version.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${LOCALLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localllm}
VENV=${LOCALLLM_VENV:-$ROOT/.venv}
LOCK=$ROOT/scripts/requirements.lock  # pip constraints: the tested versions, installed here and by install.sh
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
  [ -f "$LOCK" ] || { say "$LOCK is missing: make it with bash scripts/dev.sh lock"; exit 1; }
  say "installing localllm and its test dependencies into $VENV, at the versions of $LOCK"
  mkdir -p "$CACHE"
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$LOCK" -e "$ROOT[test]" \
    >"$CACHE/pip.log" 2>&1; then
    tail -30 "$CACHE/pip.log" >&2; say "pip install failed; full log: $CACHE/pip.log"; exit 1
  fi
}

# Resolve pyproject.toml's dependencies afresh (runtime, the [test] extra and the build backend) in a
# clean venv, through this machine's pip settings, and write what was installed, pinned, to $LOCK.
lock() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "Python 3.11 or newer is needed"; exit 1; }
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand $tmp now: it is local
  trap "rm -rf '$tmp'" EXIT
  python3 - "$ROOT/pyproject.toml" >"$tmp/requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    pyproject = tomllib.load(handle)
project = pyproject["project"]
print(*pyproject["build-system"]["requires"], *project["dependencies"], *project["optional-dependencies"]["test"], sep="\n")
PY
  say "resolving $(wc -l <"$tmp/requirements.txt") requirements of pyproject.toml in a clean venv"
  python3 -m venv "$tmp/venv"
  if ! "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check -r "$tmp/requirements.txt" \
    >"$tmp/pip.log" 2>&1; then
    tail -30 "$tmp/pip.log" >&2; say "pip install failed"; exit 1
  fi
  {
    echo "# The tested versions of localllm's dependencies: the runtime ones, the [test] extra's and the build backend"
    echo "# (setuptools), all that pip installed for them in a clean venv, as pip constraints (-c). scripts/dev.sh"
    echo "# installs the test venv with it and install.sh the host's venv (and --wheels DIR must hold these wheels)."
    echo "# Resolved with $("$tmp/venv/bin/python" -c 'import platform; print("Python", platform.python_version(), "on", platform.system(), platform.machine())')."
    echo "# Refresh: bash scripts/dev.sh lock, then bash scripts/dev.sh test. Do not edit by hand."
    "$tmp/venv/bin/python" -m pip freeze --all --exclude pip --disable-pip-version-check
  } >"$LOCK.new"
  if grep -q -e '://' -e ' @ ' "$LOCK.new"; then
    rm -f "$LOCK.new"; say "pip freeze gave a URL (a direct reference); the lock takes only index pins"; exit 1
  fi
  mv "$LOCK.new" "$LOCK"
  say "wrote $LOCK: $(grep -c '==' "$LOCK") pins; bash scripts/dev.sh setup installs them into $VENV"
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

# The randomized fault soak: bash scripts/dev.sh soak [--minutes N (default 10)] [--seed S] [--out DIR].
# Report: bench/results/soak.md, soak.json, soak.svg. The dockerd-restart fault runs only with
# LOCALLLM_SOAK_ALLOW_ENGINE_RESTART=1 in the environment.
run_soak() {
  setup
  say "running the fault soak (report: bench/results/soak.md)"
  python -m bench.soak "$@"
}

# The proxy's coverage-guided fuzzer (atheris over tests/fuzz/harness.py; no Docker needed):
#   bash scripts/dev.sh fuzz [--runs N (default 200000)] [libFuzzer flags: -max_total_time=S -seed=S -jobs=J ...]
# Inputs that reached new branches go to $CACHE/fuzz/new, the input of a finding to $CACHE/fuzz/findings/
# (replay it: python -m tests.fuzz.proxy_fuzz FILE), the counts to $CACHE/fuzz/stats.json. To keep the new
# inputs that add coverage in the repo's corpus: python -m tests.fuzz.proxy_fuzz -merge=1 tests/fuzz/corpus $CACHE/fuzz/new
run_fuzz() {
  ensure_venv
  local runs=200000 work="$CACHE/fuzz" state
  local flags=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --runs) runs=$2; shift 2 ;;
      --runs=*) runs=${1#--runs=}; shift ;;
      *) flags+=("$1"); shift ;;
    esac
  done
  mkdir -p "$work/new" "$work/findings"
  state=$(mktemp -d /tmp/lf-XXXXXX)  # the fake model servers' sockets: a path short enough for a socket
  # shellcheck disable=SC2064  # expand $state now: it is local
  trap "rm -rf '$state'" EXIT
  say "fuzzing the proxy for $runs inputs (new inputs: $work/new, findings: $work/findings)"
  if ! LOCALLLM_FUZZ_STATS="$work/stats.json" LOCALLLM_FUZZ_TMP="$state" python -m tests.fuzz.proxy_fuzz \
    -runs="$runs" -dict="$ROOT/tests/fuzz/proxy.dict" -artifact_prefix="$work/findings/" \
    ${flags[@]+"${flags[@]}"} "$work/new" "$ROOT/tests/fuzz/corpus"; then
    say "a finding: its input is in $work/findings (replay: python -m tests.fuzz.proxy_fuzz FILE)"; exit 1
  fi
  say "done: $(cat "$work/stats.json")"
}

case "${1:-}" in
  demo) demo ;;
  test) shift; run_tests "$@" ;;
  bench) shift; run_bench "$@" ;;
  soak) shift; run_soak "$@" ;;
  fuzz) shift; run_fuzz "$@" ;;
  setup) setup ;;
  lock) lock ;;
  *) echo "usage: bash scripts/dev.sh demo|test [pytest args]|bench [--quick] [--only ...]|soak [--minutes N] [--seed S]|fuzz [--runs N]|setup|lock" >&2; exit 2 ;;
esac
