#!/usr/bin/env bash
# Get this machine ready to build and run the compose cluster (tests/compose, .ci/run) when it
# has no container registry and no Docker engine of its own. Idempotent; needs root for steps
# it actually has to do. Everything it makes is passed to the builds through the Dockerfiles'
# existing build arguments, so the files a user builds with public registries stay as they are.
#
#   1. engine: a running one is used as it is. Otherwise Debian 13's docker.io, docker-cli,
#      docker-compose (Compose v2, the CLI plugin) and containerd are unpacked under
#      $CRS_ENGINE_DIR (apt-get download: the host's Debian 12 stays as it is; compose's
#      healthcheck start_interval needs Engine >= 25, Debian 12's is 20.10), with Debian 12's
#      own runc, iptables and tini from apt, and dockerd is started.
#   2. base image ($CRS_BASE_IMAGE, for PYTHON_IMAGE): Debian 12 from Debian's archive
#      (mmdebstrap) with python3 + venv, trusting the host's CA bundle (pip through a
#      TLS-inspecting proxy), imported with `docker import`.
#   3. torch source (for TORCH_INDEX_URL): a small package index with the CPU torch wheel
#      from this machine's disk and its dependencies, served on the Docker bridge address.
#
# Prints KEY=VALUE lines (also written to $CRS_COMPOSE_STATE/env): DOCKER (a client that
# builds with BuildKit and has the compose plugin), PYTHON_IMAGE, TORCH_INDEX_URL.
set -euo pipefail

STATE=${CRS_COMPOSE_STATE:-/var/tmp/crs-compose}
ENGINE_DIR=${CRS_ENGINE_DIR:-/opt/crs-docker}
BASE_IMAGE=${CRS_BASE_IMAGE:-crs-local/python:3.11-bookworm}
TORCH_VERSION=${CRS_TORCH_VERSION:-2.13.0}
INDEX_PORT=${CRS_INDEX_PORT:-8765}
mkdir -p "$STATE"
log() { echo "[compose-test-env] $*" >&2; }

# ---- 1. engine -------------------------------------------------------------------------
engine_ok() { "$1" info >/dev/null 2>&1 && "$1" compose version >/dev/null 2>&1; }

DOCKER=""
# Debian's client first: it builds with BuildKit by itself, where a newer upstream CLI
# without the buildx plugin falls back to the legacy builder (which rejects COPY --chmod).
for cand in "$ENGINE_DIR/usr/bin/docker" /usr/bin/docker "$(command -v docker || true)"; do
  if [[ -n "$cand" && -x "$cand" ]] && engine_ok "$cand"; then DOCKER=$cand; break; fi
done

if [[ -z "$DOCKER" ]]; then
  [[ $(id -u) -eq 0 ]] || { log "no working Docker engine and not root: cannot install one"; exit 3; }
  if [[ ! -x "$ENGINE_DIR/usr/sbin/dockerd" ]]; then
    log "installing runc/iptables/tini (Debian 12) and unpacking Debian 13's engine into $ENGINE_DIR"
    apt-get install -y -q runc iptables tini >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q runc iptables tini >/dev/null; }
    # A private apt state for the trixie suite: nothing of the host's apt setup changes.
    APT="$STATE/apt"
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
    echo "deb http://deb.debian.org/debian trixie main" > "$APT/sources.list"
    aptopts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" update -q >/dev/null
    (cd "$APT/debs" && apt-get "${aptopts[@]}" download docker.io docker-cli docker-compose containerd >/dev/null)
    mkdir -p "$ENGINE_DIR"
    for deb in "$APT"/debs/*.deb; do dpkg -x "$deb" "$ENGINE_DIR"; done
  fi
  # docker-init (compose's `init: true`) links to tini-static beside it, which the tini
  # package installs in /usr/bin.
  ln -sf /usr/bin/tini-static "$ENGINE_DIR/usr/bin/tini-static"
  # The CLI finds Compose v2 in its plugin folder.
  mkdir -p /usr/local/lib/docker/cli-plugins
  ln -sf "$ENGINE_DIR/usr/libexec/docker/cli-plugins/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
  DOCKER="$ENGINE_DIR/usr/bin/docker"
  if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd (log: $STATE/dockerd.log)"
    # Debian 13's runc needs glibc 2.38: Debian 12's own runc (/usr/sbin) comes first.
    PATH="/usr/sbin:/usr/bin:$ENGINE_DIR/usr/sbin:$ENGINE_DIR/usr/bin:$PATH" \
      setsid nohup "$ENGINE_DIR/usr/sbin/dockerd" --pidfile "$STATE/dockerd.pid" \
      >"$STATE/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  fi
  engine_ok "$DOCKER" || { log "dockerd did not come up:"; tail -20 "$STATE/dockerd.log" >&2; exit 3; }
fi
BRIDGE_IP=$("$DOCKER" network inspect bridge --format '{{(index .IPAM.Config 0).Gateway}}')

# ---- 2. base image ---------------------------------------------------------------------
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || apt-get install -y -q mmdebstrap >/dev/null
  log "building $BASE_IMAGE with mmdebstrap (about a minute)"
  tarball="$STATE/base.tar"
  # python-is-python3: the Dockerfiles call `python`, as the python:3.11 images provide it.
  # The host's CA bundle replaces the image's, and pip is told to use it (pip ships its own
  # CA list otherwise); the bridge host serves the torch index over plain HTTP.
  mmdebstrap --quiet --variant=apt \
    --include=python3,python3-venv,python-is-python3,ca-certificates,procps,wget \
    --customize-hook="upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt" \
    --customize-hook="printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ntrusted-host = $BRIDGE_IP\n' > \"\$1/etc/pip.conf\"" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$tarball"
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null
  rm -f "$tarball"
fi

# ---- 3. torch index --------------------------------------------------------------------
INDEX="$STATE/index"
if [[ ! -d "$INDEX/simple/torch" ]]; then
  log "collecting torch==$TORCH_VERSION (CPU, from local disk) and its dependencies"
  py=$(command -v python3)
  mkdir -p "$INDEX/wheels"
  # pip's find-links on these machines hold the CPU wheel; PyPI has the rest.
  "$py" -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    -d "$INDEX/wheels" "torch==$TORCH_VERSION"
  "$py" - "$INDEX" <<'PY'
import pathlib, re, sys
root = pathlib.Path(sys.argv[1])
by_name = {}
for whl in sorted((root / "wheels").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    by_name.setdefault(name, []).append(whl.name)
for name, files in by_name.items():
    d = root / "simple" / name
    d.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../wheels/{f}">{f}</a><br>\n' for f in files)
    (d / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
(root / "simple" / "index.html").write_text(
    "<html><body>\n" + "".join(f'<a href="{n}/">{n}</a><br>\n' for n in by_name) + "</body></html>\n")
PY
fi
url="http://$BRIDGE_IP:$INDEX_PORT/simple"
if ! python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=3)" "$url" 2>/dev/null; then
  log "serving the torch index at $url"
  setsid nohup python3 -m http.server "$INDEX_PORT" --bind "$BRIDGE_IP" --directory "$INDEX" \
    >"$STATE/index.log" 2>&1 </dev/null &
  echo $! > "$STATE/index.pid"
  for _ in $(seq 1 20); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=3)" "$url" 2>/dev/null && break
    sleep 0.5
  done
fi

{
  echo "DOCKER=$DOCKER"
  echo "PYTHON_IMAGE=$BASE_IMAGE"
  echo "TORCH_INDEX_URL=$url"
} | tee "$STATE/env"
