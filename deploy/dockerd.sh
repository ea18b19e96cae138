# shellcheck shell=bash
# Source this file: a Docker engine for scripts that need one (.ci/run, deploy/smoke.sh).
#
#   source deploy/dockerd.sh
#   dockerd_ensure || exit 1      # use the engine that answers, or start one (root, dockerd installed)
#   trap dockerd_stop_started EXIT  # stop it again, by PID, only if this shell started it
#
# Why a shared helper: the machines this project runs on have the Docker client but no engine, and only one
# engine may run on a machine. An engine someone else started is used and left alone; one started here is
# stopped by its PID when the script ends, because while dockerd runs it sets the iptables FORWARD policy to
# DROP, which breaks other tests' hand-made bridges.

DOCKERD_STARTED_PID=""
DOCKERD_LOG=""

# True when an engine answers `docker info`.
dockerd_answers() {
  docker info >/dev/null 2>&1
}

# Use the engine that answers; otherwise start dockerd (logging to a temporary folder) and wait until it
# answers. Returns non-zero, after saying why, when there is no engine and none can be started.
dockerd_ensure() {
  if ! command -v docker >/dev/null 2>&1; then
    echo "dockerd.sh: no docker client on PATH (Debian: apt-get install docker.io)" >&2
    return 1
  fi
  if dockerd_answers; then
    return 0
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd.sh: no Docker engine answers 'docker info' and dockerd is not installed" \
      "(Debian: apt-get install docker.io iptables)" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "dockerd.sh: no Docker engine answers 'docker info', and starting dockerd needs root" >&2
    return 1
  fi
  if [ -e /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid 2>/dev/null)" 2>/dev/null; then
    echo "dockerd.sh: a dockerd (PID $(cat /var/run/docker.pid)) is running but does not answer; not starting" \
      "a second engine" >&2
    return 1
  fi
  local logdir
  logdir="$(mktemp -d "${TMPDIR:-/tmp}/mmiosplit-dockerd.XXXXXX")"
  DOCKERD_LOG="$logdir/dockerd.log"
  dockerd >"$DOCKERD_LOG" 2>&1 &
  DOCKERD_STARTED_PID=$!
  local i
  for i in $(seq 150); do
    if dockerd_answers; then
      echo "dockerd.sh: started dockerd (PID $DOCKERD_STARTED_PID, log $DOCKERD_LOG) after $i polls" >&2
      return 0
    fi
    if ! kill -0 "$DOCKERD_STARTED_PID" 2>/dev/null; then
      echo "dockerd.sh: dockerd exited at once; the end of its log ($DOCKERD_LOG):" >&2
      tail -n 20 "$DOCKERD_LOG" >&2
      DOCKERD_STARTED_PID=""
      return 1
    fi
    sleep 0.2
  done
  echo "dockerd.sh: dockerd (PID $DOCKERD_STARTED_PID) did not answer within 30 s; stopping it. Its log:" >&2
  tail -n 20 "$DOCKERD_LOG" >&2
  dockerd_stop_started
  return 1
}

# Stop the dockerd this shell started (SIGTERM, then SIGKILL after 20 s), by its PID; nothing otherwise.
dockerd_stop_started() {
  local pid="$DOCKERD_STARTED_PID"
  [ -n "$pid" ] || return 0
  DOCKERD_STARTED_PID=""
  kill -TERM "$pid" 2>/dev/null || return 0
  local i
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { echo "dockerd.sh: stopped dockerd (PID $pid)" >&2; return 0; }
    sleep 0.2
  done
  echo "dockerd.sh: dockerd (PID $pid) ignored SIGTERM for 20 s ($i polls); killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}
