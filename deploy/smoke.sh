#!/usr/bin/env bash
# The containers end to end, in one command, for a person and for CI:
#
#   deploy/smoke.sh [--local-base] [--no-build]
#
# 1. engine   a Docker engine that answers (one is started, and stopped again at the end, when none does)
# 2. image    deploy/build-images.sh builds mmiosplit:dev; FROM python:3.11-slim when it is here or can be
#             pulled, otherwise (or with --local-base) FROM a Debian 12 base made with debootstrap
# 3. flash    Debian's U-Boot for QEMU arm64 (u-boot-qemu) onto the stack's flash volume, as flash0.img
# 4. stack    deploy/compose.yaml up, under a project name of its own; every service healthy
# 5. port     the vcpu service's port answers on 127.0.0.1, and only there
# 6. hello    the bundled A64 hello guest through the containers (a client container on the stack's network,
#             the vcpu container, the guests container): its console equals guests/expected/hello-a64-1cpu.txt
# 7. u-boot   U-Boot with the virt board's devices (devices container) to its `=>` prompt, then a write and a
#             read of the scratch device (scratch container) from its prompt, then poweroff
#
# One `PASS <step>` or `FAIL <step>: reason` line per step; everything it made is removed at the end (containers,
# network, volume, and the engine if it started one); exit status 0 only when every step passed.
#
# Options: --local-base (always the debootstrap base), --no-build (use the existing mmiosplit:dev), -h.
# Environment: MMIOSPLIT_SUBNET and MMIOSPLIT_VCPU_PORT (default: a free 172.28.N.0/24 and a free port),
# UBOOT (default /usr/lib/u-boot/qemu_arm64/u-boot.bin), SMOKE_KEEP_LOGS=1 (keep the work folder).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=deploy/dockerd.sh
source "$ROOT/deploy/dockerd.sh"

IMAGE="mmiosplit:dev"
REGISTRY_BASE="python:3.11-slim"
UBOOT="${UBOOT:-/usr/lib/u-boot/qemu_arm64/u-boot.bin}"
HELLO_EXPECTED="$ROOT/guests/expected/hello-a64-1cpu.txt"
LOCAL_BASE=0
BUILD=1

while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) LOCAL_BASE=1 ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$LOCAL_BASE" -eq 1 ] && [ "$BUILD" -eq 0 ]; then
  echo "smoke.sh: --local-base chooses how to build; --no-build builds nothing" >&2
  exit 2
fi

T_START=$SECONDS
FAILED=()
STACK_CREATED=0
PROJECT="mmiosplitsmoke$$"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mmiosplit-smoke.XXXXXX")"
COMPOSE=()

pass() { echo "PASS $1${2:+: $2}"; }
fail() { echo "FAIL $1: $2"; FAILED+=("$1"); }
since() { echo "$((SECONDS - $1)) s"; }

compose() {
  "${COMPOSE[@]}" -f "$ROOT/deploy/compose.yaml" -p "$PROJECT" "$@"
}

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  exec 3>&- || true
  if [ -n "${uboot_pid:-}" ]; then
    kill "$uboot_pid" 2>/dev/null || true
  fi
  if [ "$STACK_CREATED" -eq 1 ]; then
    # One-off `run` containers first (a client still running holds the network), then the rest.
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -f >/dev/null 2>&1 || true
    if ! compose down --volumes --remove-orphans --timeout 20 >>"$WORK/compose-down.log" 2>&1; then
      echo "smoke.sh: 'compose down' failed for project $PROJECT; see $WORK/compose-down.log" >&2
      SMOKE_KEEP_LOGS=1
    fi
  fi
  dockerd_stop_started
  if [ "${SMOKE_KEEP_LOGS:-0}" = 1 ] || [ "${#FAILED[@]}" -gt 0 ]; then
    echo "smoke.sh: logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "smoke.sh: interrupted" >&2; exit 130' INT
trap 'echo "smoke.sh: terminated" >&2; exit 143' TERM

finish() {
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "smoke.sh: FAILED: ${FAILED[*]} ($(since "$T_START"))"
    exit 1
  fi
  echo "smoke.sh: every step passed ($(since "$T_START"))"
  exit 0
}

# A free 172.28.N.0/24 (N = 10..250) that no Docker network uses: two stacks (a test's and this one) can run at once.
free_subnet() {
  local used n
  # shellcheck disable=SC2046  # one argument per network id
  used="$(docker network inspect --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}' $(docker network ls -q) 2>/dev/null || true)"
  for n in $(seq 10 250); do
    case " $used " in *" 172.28.$n.0/24 "*) ;; *) echo "172.28.$n.0/24"; return 0 ;; esac
  done
  return 1
}

# A TCP port nothing listens on at 127.0.0.1.
free_port() {
  local port i
  for i in $(seq 50); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 4<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

# ---- 1. engine -------------------------------------------------------------------------------------------
t=$SECONDS
if ! dockerd_ensure 2>"$WORK/dockerd.txt"; then
  fail engine "$(tr '\n' ' ' <"$WORK/dockerd.txt")"
  finish
fi
if [ -n "$DOCKERD_STARTED_PID" ]; then
  pass engine "started dockerd (PID $DOCKERD_STARTED_PID, stopped again at the end) ($(since "$t"))"
else
  pass engine "docker info answers (server $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
fi
if command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  fail engine "neither docker-compose nor 'docker compose' is installed (Debian: apt-get install docker-compose)"
  finish
fi

# ---- 2. image --------------------------------------------------------------------------------------------
t=$SECONDS
if [ "$BUILD" -eq 0 ]; then
  if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    pass image "$IMAGE exists (--no-build)"
  else
    fail image "$IMAGE does not exist; run without --no-build"
    finish
  fi
else
  build_args=()
  why=""
  if [ "$LOCAL_BASE" -eq 1 ]; then
    build_args=(--local-base)
    why="--local-base"
  elif docker image inspect "$REGISTRY_BASE" >/dev/null 2>&1; then
    why="$REGISTRY_BASE is here"
  elif timeout 120 docker pull "$REGISTRY_BASE" >"$WORK/pull.log" 2>&1; then
    why="pulled $REGISTRY_BASE"
  else
    build_args=(--local-base)
    why="docker pull $REGISTRY_BASE failed: no registry answers"
  fi
  if "$ROOT/deploy/build-images.sh" "${build_args[@]}" --tag "$IMAGE" >"$WORK/build.log" 2>&1; then
    base="$(grep '^== image:' "$WORK/build.log" | grep -o 'FROM [^ ]*' | head -n 1 || true)"
    pass image "$IMAGE $base ($why) ($(since "$t"))"
  else
    fail image "deploy/build-images.sh failed: $(grep 'build-images.sh:' "$WORK/build.log" | tail -n 1) (log: $WORK/build.log)"
    finish
  fi
fi

export MMIOSPLIT_IMAGE="$IMAGE"
MMIOSPLIT_SUBNET="${MMIOSPLIT_SUBNET:-$(free_subnet || true)}"
MMIOSPLIT_VCPU_PORT="${MMIOSPLIT_VCPU_PORT:-$(free_port || true)}"
export MMIOSPLIT_SUBNET MMIOSPLIT_VCPU_PORT
if [ -z "$MMIOSPLIT_SUBNET" ] || [ -z "$MMIOSPLIT_VCPU_PORT" ]; then
  fail stack "no free 172.28.N.0/24 subnet or TCP port found; set MMIOSPLIT_SUBNET and MMIOSPLIT_VCPU_PORT"
  finish
fi

# ---- 3. flash --------------------------------------------------------------------------------------------
# The flash volume is created by this first `run` (the tool needs no other service), before `devices` starts:
# it reads flash0.img once, when it starts.
t=$SECONDS
STACK_CREATED=1
have_uboot=0
if [ -r "$UBOOT" ]; then
  if compose run --rm -T flash-load flash0.img <"$UBOOT" >"$WORK/flash.log" 2>&1; then
    have_uboot=1
    pass flash "$(basename "$UBOOT") ($(stat -c %s "$UBOOT") bytes) onto the flash volume as flash0.img ($(since "$t"))"
  else
    fail flash "flash-load failed: $(tail -n 1 "$WORK/flash.log")"
  fi
else
  fail flash "$UBOOT not found (Debian: apt-get install u-boot-qemu); the virt board's flash stays erased"
fi

# ---- 4. stack --------------------------------------------------------------------------------------------
t=$SECONDS
stack_ok=0
if ! compose up -d >"$WORK/up.log" 2>&1; then
  fail stack "compose up failed: $(grep -i error "$WORK/up.log" | tail -n 1) (log: $WORK/up.log)"
else
  states=""
  for _ in $(seq 120); do
    # shellcheck disable=SC2046  # one argument per container id
    states="$(docker inspect --format '{{.Name}}={{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' \
      $(compose ps -q) 2>/dev/null | sed 's|^/||' | tr '\n' ' ' || true)"
    if [ "$(echo "$states" | grep -o '=healthy' | wc -l || true)" -eq 4 ]; then
      stack_ok=1
      break
    fi
    case "$states" in *unhealthy*|*exited*|*restarting*) break ;; esac
    sleep 1
  done
  if [ "$stack_ok" -eq 1 ]; then
    pass stack "vcpu, devices, scratch, guests healthy on $MMIOSPLIT_SUBNET ($(since "$t"))"
  else
    compose logs --no-color --tail 20 >"$WORK/stack.log" 2>&1 || true
    fail stack "not every service became healthy: $states(logs: $WORK/stack.log)"
  fi
fi

# ---- 5. port ---------------------------------------------------------------------------------------------
if [ "$stack_ok" -eq 1 ]; then
  published="$(docker port "$(compose ps -q vcpu)" 50051 2>/dev/null | tr '\n' ' ' || true)"
  if [ "$published" != "127.0.0.1:$MMIOSPLIT_VCPU_PORT " ]; then
    fail port "vcpu's 50051 is published as '$published', expected only 127.0.0.1:$MMIOSPLIT_VCPU_PORT"
  elif ! (exec 4<>"/dev/tcp/127.0.0.1/$MMIOSPLIT_VCPU_PORT") 2>/dev/null; then
    fail port "nothing answers on 127.0.0.1:$MMIOSPLIT_VCPU_PORT"
  else
    pass port "vcpu service on 127.0.0.1:$MMIOSPLIT_VCPU_PORT only"
  fi
else
  fail port "the stack is not up"
fi

# ---- 6. hello --------------------------------------------------------------------------------------------
t=$SECONDS
if [ "$stack_ok" -eq 1 ]; then
  set +e
  compose run --rm -T client run /opt/mmiosplit/guests/bin/hello-a64.bin \
    --vcpu-service vcpu:50051 --device-service guests:50054 --timeout 120 \
    </dev/null >"$WORK/hello.out" 2>"$WORK/hello.err"
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    fail hello "mmiosplit run exited $rc: $(grep -v '^Creating' "$WORK/hello.err" | tail -n 2 | tr '\n' ' ')"
  elif ! cmp -s "$WORK/hello.out" "$HELLO_EXPECTED"; then
    diff "$HELLO_EXPECTED" "$WORK/hello.out" >"$WORK/hello.diff" || true
    fail hello "the console differs from guests/expected/hello-a64-1cpu.txt ($(wc -l <"$WORK/hello.diff") diff lines: $WORK/hello.diff)"
  else
    pass hello "hello-a64.bin console equals guests/expected/hello-a64-1cpu.txt; $(grep -o '[0-9]* exits.*' "$WORK/hello.err" | head -n 1) ($(since "$t"))"
  fi
else
  fail hello "the stack is not up"
fi

# ---- 7. u-boot -------------------------------------------------------------------------------------------
# The console is driven like a person at a terminal: a key when the autoboot countdown shows, then one command
# per new `=> ` prompt (U-Boot drops what is typed ahead). Input goes through a FIFO the run reads as stdin.
UBOOT_COMMANDS=("mw.l 0x0b000000 0x5a5aa5a5" "md.l 0x0b000000 1" "poweroff")
UBOOT_EXPECT="0b000000: 5a5aa5a5"
t=$SECONDS
if [ "$stack_ok" -eq 1 ] && [ "$have_uboot" -eq 1 ]; then
  mkfifo "$WORK/uboot.in"
  : >"$WORK/uboot.out"
  compose run --rm -T client run --machine virt \
    --vcpu-service vcpu:50051 --device-service devices:50052 --device-service scratch:50053 --timeout 300 -q \
    <"$WORK/uboot.in" >"$WORK/uboot.out" 2>"$WORK/uboot.err" &
  uboot_pid=$!
  exec 3>"$WORK/uboot.in"
  key=0
  typed=0
  t_prompt=""
  while kill -0 "$uboot_pid" 2>/dev/null && [ $((SECONDS - t)) -lt 240 ]; do
    if [ "$key" -eq 0 ] && grep -q 'Hit any key to stop autoboot' "$WORK/uboot.out"; then
      printf ' ' >&3
      key=1
    fi
    prompts="$(tr -d '\r' <"$WORK/uboot.out" | grep -o '=> ' | wc -l || true)"
    if [ "$prompts" -gt 0 ] && [ -z "$t_prompt" ]; then
      t_prompt=$(since "$t")
    fi
    if [ "$typed" -lt "${#UBOOT_COMMANDS[@]}" ] && [ "$prompts" -gt "$typed" ]; then
      printf '%s\r' "${UBOOT_COMMANDS[$typed]}" >&3
      typed=$((typed + 1))
    fi
    sleep 0.2
  done
  ended=""
  if kill -0 "$uboot_pid" 2>/dev/null; then
    kill "$uboot_pid" 2>/dev/null || true
    ended="still running after 240 s; stopped"
  fi
  set +e
  wait "$uboot_pid" 2>/dev/null
  rc=$?
  set -e
  uboot_pid=""
  exec 3>&-
  if [ -z "$ended" ]; then
    ended="$( [ "$rc" -eq 0 ] && echo "powered off (exit 0)" || echo "run exited $rc")"
  fi
  console="$(tr -d '\r' <"$WORK/uboot.out")"
  if [ -z "$t_prompt" ]; then
    fail u-boot "no '=>' prompt within 240 s: $(echo "$console" | grep -v '^$' | tail -n 2 | tr '\n' ' ') $(grep -v '^Creating' "$WORK/uboot.err" | tail -n 1)"
  elif ! echo "$console" | grep -q "^$UBOOT_EXPECT"; then
    fail u-boot "'=>' in $t_prompt, but the scratch device did not read back ('$UBOOT_EXPECT' missing; $ended; console: $WORK/uboot.out)"
  elif [ "$rc" -ne 0 ]; then
    fail u-boot "'=>' in $t_prompt and the scratch device read back, but $ended"
  else
    pass u-boot "$(echo "$console" | grep -m1 '^U-Boot 20' || echo U-Boot) reached '=>' in $t_prompt; the scratch container's register read back from its prompt; $ended"
  fi
elif [ "$stack_ok" -eq 1 ]; then
  fail u-boot "no U-Boot image on the flash volume (see the flash step)"
else
  fail u-boot "the stack is not up"
fi

finish
