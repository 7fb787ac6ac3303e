#!/usr/bin/env bash
# Make sure a Docker engine is answering. CI machines have no systemd as init,
# so we install docker.io if needed and start dockerd by hand in the background.
set -euo pipefail

LOG=/tmp/aviato-dockerd.log
TIMEOUT="${AVIATO_DOCKER_WAIT:-60}"   # seconds to wait for the daemon

log() { echo "ensure-docker: $*" >&2; }

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo "ensure-docker: docker is already running"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    log "docker is not answering and we are not root, so we cannot start it"; exit 1
fi

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    log "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends docker.io
fi

# Don't start a second daemon if one is already coming up (e.g. a previous run
# started it and it is still initialising); just wait for it.
if pgrep -x dockerd >/dev/null; then
    log "dockerd is already running (pid $(pgrep -x dockerd | tr '\n' ' ')), waiting for it"
else
    log "starting dockerd (log: $LOG)"
    # setsid+nohup: keep the daemon alive after this script / the CI step's shell exits.
    nohup setsid dockerd >>"$LOG" 2>&1 </dev/null &
fi

for ((i = 0; i < TIMEOUT; i++)); do
    if docker info >/dev/null 2>&1; then
        echo "ensure-docker: docker is up after ${i}s"
        exit 0
    fi
    if ! pgrep -x dockerd >/dev/null; then
        log "dockerd exited; last lines of $LOG:"
        tail -n 40 "$LOG" >&2 || true
        exit 1
    fi
    sleep 1
done

log "docker did not answer within ${TIMEOUT}s; last lines of $LOG:"
tail -n 40 "$LOG" >&2 || true
exit 1
