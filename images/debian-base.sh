#!/usr/bin/env bash
# The base image of every cart-intent image when BASE_IMAGES=debian: Debian 12 from Debian's own packages
# (debootstrap + `docker import`), for Docker hosts that reach a Debian mirror and a Python package index but
# not Docker Hub, ghcr.io or nvcr.io. It stands in for python:3.11-slim and both nvidia/cuda bases: Python is
# Debian's python3 (3.11), and the CUDA libraries come inside torch's wheels (the driver from the host), as
# they do on nvidia's `base` flavour. What it lacks against `devel`: nvcc, so gptqmodel's CUDA kernels that
# compile just in time fall back to slower ones on a GPU.
#
#   images/debian-base.sh REF          # make images BASE_IMAGES=debian runs it; REF from images/tags.py bases
#   DEBIAN_MIRROR=http://snapshot.debian.org/archive/debian/20261201T000000Z images/debian-base.sh REF
#
# REF's tag hashes this file (suite and package list), so a change here rebuilds every image on top of it.
# Needs root (debootstrap), debootstrap and a Docker engine. Exit codes: 0 built or present, 1 a step failed,
# 2 usage or a missing tool.
set -euo pipefail
ref=${1:?usage: images/debian-base.sh REF}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# passwd: useradd for the images' non-root user; python3-dev: torch and gptqmodel compile C++ extensions at run
# time against Python's headers
PACKAGES=ca-certificates,passwd,python3,python3-venv,python3-dev,python-is-python3,libgomp1

if docker image inspect "$ref" >/dev/null 2>&1; then
  echo "$ref: present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "images/debian-base.sh needs root (debootstrap): run make images as root or sudo"; exit 2; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT INT TERM
echo "$ref: debootstrap $SUITE from $MIRROR (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -5 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $SUITE-security main
EOF
# no apt lists, caches or logs in the image
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$ref" >/dev/null
echo "$ref: built ($(docker image inspect --format '{{.Size}}' "$ref" | awk '{printf "%.0f MB", $1 / 1e6}'))"
