#!/usr/bin/env bash
# The container image, built and run, on a machine with no Docker daemon and no container registry.
#
#   bash scripts/container_check.sh        (or `make container-check`; as root, Debian/Ubuntu host)
#
# 1. buildah and debootstrap, installed with apt-get when missing.
# 2. The base: the Dockerfile's default (python:3.12-slim) when it can be pulled. Otherwise a local
#    stand-in, made once and kept as localhost/lcmserve-base:bookworm: Debian bookworm from
#    `debootstrap --variant=minbase` plus python3, python3-venv, ca-certificates, netbase and
#    tzdata, with a venv at /opt/python first on PATH (so `python` and `pip` are found as in
#    python:3.12-slim). What differs from python:3.12-slim: Debian's Python 3.11 instead of a
#    source-built 3.12 in /usr/local, pip 23.0 (Debian's bundled wheel), and this machine's own
#    certificate authorities (/usr/local/share/ca-certificates) added to the trust store with
#    PIP_CERT pointing at it, so that pip reaches PyPI through this machine's TLS proxy.
# 3. A build context: a copy of the working tree's files that git tracks or would track, in
#    $LCMSERVE_CHECK_DIR (default /var/tmp/lcmserve-container-check), plus wheels/ holding the
#    torch wheel that pip resolves here for the base's Python (`pip download torch==2.13.0
#    --no-deps`: the CPU build, from local disk), passed as TORCH; TORCHVISION is left out (PyPI's
#    torchvision goes with PyPI's CUDA torch; without it the server encodes JPEG on the host).
# 4. `buildah build --isolation chroot --network host --format docker` of the project's Dockerfile
#    (docker format: OCI image configs drop HEALTHCHECK). Its time is the build time.
# 5. From the built image's root filesystem (`buildah from`, then `buildah run --isolation chroot`,
#    which applies the image's environment and working directory), as the image's USER, its
#    ENTRYPOINT with `--model tiny --device cpu` in place of its CMD: the server, on the image's own
#    ports, inside a network namespace of its own where only loopback exists (the ports are free
#    there and nothing else on the machine reaches them). From outside the image, with this
#    checkout's client ($LCMSERVE_CLIENT, default .venv/bin/lcmserve): health SERVING; /models
#    writable by the image's user; `lcmserve generate` writes an image; the Dockerfile's
#    HEALTHCHECK command, run inside the image, exits 0; SIGTERM during a request: the request
#    finishes and the server exits 0.
#
# Prints each step's outcome and time, the image's size and the build time; exits 1 at the first
# step that fails. The working container, the network namespace and the server are removed on
# exit; the two images stay (later runs reuse their layers): `buildah rmi localhost/lcmserve-check
# localhost/lcmserve-base:bookworm` removes them. LCMSERVE_CHECK_NO_CACHE=1 builds without the
# layer cache; LCMSERVE_CHECK_BASE=IMAGE uses IMAGE as the base.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${LCMSERVE_CHECK_DIR:-/var/tmp/lcmserve-container-check}
IMAGE=localhost/lcmserve-check:latest
LOCAL_BASE=localhost/lcmserve-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LCMSERVE=${LCMSERVE_CLIENT:-$REPO/.venv/bin/lcmserve}
PIP_PYTHON=$(dirname "$LCMSERVE")/python  # resolves the torch wheel with this machine's pip settings
READY_TIMEOUT_S=${LCMSERVE_CHECK_READY_TIMEOUT:-600}
NETNS=lcmserve-check-$$

STEPS=(
  "buildah and debootstrap"
  "base image"
  "build context and torch wheel"
  "buildah build of the Dockerfile"
  "image config: non-root USER, ENTRYPOINT, HEALTHCHECK"
  "serve --model tiny --device cpu: health SERVING"
  "/models writable by the image's user"
  "lcmserve generate writes an image"
  "the Dockerfile's HEALTHCHECK command"
  "SIGTERM during a request: it finishes, exit 0"
)
declare -A OUTCOME=() TOOK=()
CURRENT="" STEP_T0=0 T_START=$SECONDS
BUILD_S="" IMAGE_SIZE="" BASE="" CTR="" RUN_PID="" SERVER_PID="" GEN_PID=""

step() { CURRENT=$1; STEP_T0=$SECONDS; printf '\n== %s\n' "$1"; }
ok() { OUTCOME[$CURRENT]=ok; TOOK[$CURRENT]=$((SECONDS - STEP_T0)); CURRENT=""; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
in_netns() { ip netns exec "$NETNS" "$@"; }

cleanup() {
  for pid in "$GEN_PID" "$SERVER_PID" "$RUN_PID"; do
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
  done
  [[ -n $RUN_PID ]] && wait "$RUN_PID" 2>/dev/null || true
  [[ -n $CTR ]] && buildah rm "$CTR" >/dev/null 2>&1 || true
  ip netns delete "$NETNS" 2>/dev/null || true
  rm -rf "$WORK/context"
}

summary() {
  printf '\n== container check: %s\n' "$1"
  local name
  for name in "${STEPS[@]}"; do
    printf '  %-8s %6s  %s\n' "${OUTCOME[$name]:-not run}" "${TOOK[$name]:+${TOOK[$name]}s}" "$name"
  done
  printf '  base image   %s\n' "${BASE:-?}"
  printf '  image        %s, %s\n' "$IMAGE" "${IMAGE_SIZE:-size unknown}"
  printf '  build time   %s\n' "${BUILD_S:+${BUILD_S}s}"
  printf '  total time   %ss\n' "$((SECONDS - T_START))"
}

on_exit() {
  local rc=$?
  set +e
  if [[ -n $CURRENT ]]; then OUTCOME[$CURRENT]=FAIL; TOOK[$CURRENT]=$((SECONDS - STEP_T0)); fi
  cleanup
  if ((rc == 0)); then summary "passed"; else summary "FAILED"; fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

[[ $(id -u) == 0 ]] || fail "run as root (buildah with chroot isolation, apt-get, network namespaces)"
[[ -x $LCMSERVE ]] || fail "no client at $LCMSERVE: run \`make install\` first (or set LCMSERVE_CLIENT)"
mkdir -p "$WORK"

# The Dockerfile's own defaults, so that this script and the Dockerfile cannot disagree.
dockerfile_arg() { sed -n "s/^ARG $1=//p" "$REPO/Dockerfile" | head -n 1; }
DEFAULT_BASE=$(dockerfile_arg BASE_IMAGE)
TORCH_REQUIREMENT=$(dockerfile_arg TORCH)

step "buildah and debootstrap"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
buildah --version
ok

step "base image"
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
make_local_base() {
  local ctr mnt
  ctr=$(buildah from scratch)
  CTR=$ctr
  mnt=$(buildah mount "$ctr")
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata \
    bookworm "$mnt" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap (log: $WORK/debootstrap.log)"; }
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$mnt/usr/local/share/ca-certificates/"
  fi
  chroot "$mnt" update-ca-certificates >>"$WORK/debootstrap.log" 2>&1
  chroot "$mnt" python3 -m venv /opt/python
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/var/cache/apt/archives/*.deb
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd python3 "$ctr"
  buildah commit --quiet "$ctr" "$LOCAL_BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
  CTR=""
}
if [[ -n ${LCMSERVE_CHECK_BASE:-} ]]; then
  BASE=$LCMSERVE_CHECK_BASE
  image_exists "$BASE" || buildah pull --quiet "$BASE" >/dev/null
elif image_exists "$DEFAULT_BASE" || buildah pull --quiet "$DEFAULT_BASE" >/dev/null 2>&1; then
  BASE=$DEFAULT_BASE
else
  echo "$DEFAULT_BASE cannot be pulled here: a local Debian bookworm + python3 base stands in"
  BASE=$LOCAL_BASE
  if image_exists "$LOCAL_BASE"; then echo "reusing $LOCAL_BASE"; else make_local_base; fi
fi
CTR=$(buildah from --pull=never "$BASE")
BASE_PYTHON=$(buildah run --isolation chroot "$CTR" -- python3 -c \
  'import sys; print("%d.%d" % sys.version_info[:2])')
buildah rm "$CTR" >/dev/null
CTR=""
echo "$BASE: Python $BASE_PYTHON"
ok

step "build context and torch wheel"
CONTEXT=$WORK/context
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/wheels"
# The files a clone would have (tracked, plus new ones not ignored), as they are in the working tree.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$CONTEXT"
"$PIP_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$BASE_PYTHON" \
  --dest "$CONTEXT/wheels" "$TORCH_REQUIREMENT"
TORCH_WHEEL=$(cd "$CONTEXT/wheels" && ls torch-*.whl)
echo "context: $(du -sh --exclude=wheels "$CONTEXT" | cut -f1), TORCH=./wheels/$TORCH_WHEEL" \
  "($(du -h "$CONTEXT/wheels/$TORCH_WHEEL" | cut -f1))"
ok

step "buildah build of the Dockerfile"
cache=()
[[ ${LCMSERVE_CHECK_NO_CACHE:-0} == 1 ]] && cache=(--no-cache)
t0=$SECONDS
buildah build --isolation chroot --network host --format docker --layers "${cache[@]}" --pull=never \
  --build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH=./wheels/$TORCH_WHEEL" --build-arg TORCHVISION= \
  -f "$CONTEXT/Dockerfile" -t "$IMAGE" "$CONTEXT" 2>&1 | tee "$WORK/build.log"
BUILD_S=$((SECONDS - t0))
IMAGE_SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)
echo "built $IMAGE in ${BUILD_S}s: $IMAGE_SIZE"
ok

step "image config: non-root USER, ENTRYPOINT, HEALTHCHECK"
CTR=$(buildah from --pull=never "$IMAGE")
# Hold the root filesystem mounted while several `buildah run` share it: buildah 1.28 unmounts it
# when any of them ends, and the server's own `buildah run` then panics at its exit (exit 2).
buildah mount "$CTR" >/dev/null
# One shell assignment per line from the image's (Docker format) config.
config=$(buildah inspect --type image "$IMAGE" | python3 -c '
import json, shlex, sys
config = json.load(sys.stdin)["Docker"]["config"]
entrypoint = config.get("Entrypoint") or []
port = entrypoint[entrypoint.index("--port") + 1] if "--port" in entrypoint else "50051"
test = (config.get("Healthcheck") or {}).get("Test") or []
if test[:1] == ["CMD-SHELL"]:
    test = ["/bin/sh", "-c", test[1]]
elif test[:1] == ["CMD"]:
    test = test[1:]
else:
    test = []
timeout_s = (config.get("Healthcheck") or {}).get("Timeout", 30 * 10**9) / 1e9 or 30
print("IMAGE_USER=" + shlex.quote(config.get("User") or ""))
print("ENTRYPOINT=(" + shlex.join(entrypoint) + ")")
print("HEALTHCHECK=(" + shlex.join(test) + ")")
print("HEALTHCHECK_TIMEOUT=%g" % timeout_s)
print("PORT=" + shlex.quote(port))
')
eval "$config"
echo "USER $IMAGE_USER; ENTRYPOINT ${ENTRYPOINT[*]}; HEALTHCHECK ${HEALTHCHECK[*]} (timeout ${HEALTHCHECK_TIMEOUT}s)"
[[ -n $IMAGE_USER && $IMAGE_USER != root && $IMAGE_USER != 0 && $IMAGE_USER != 0:* ]] ||
  fail "the image runs as root (USER '${IMAGE_USER}')"
((${#ENTRYPOINT[@]})) || fail "the image has no ENTRYPOINT"
((${#HEALTHCHECK[@]})) || fail "the image has no HEALTHCHECK"
ok

step "serve --model tiny --device cpu: health SERVING"
ip netns add "$NETNS"
in_netns ip link set lo up
in_netns buildah run --isolation chroot --user "$IMAGE_USER" "$CTR" -- \
  "${ENTRYPOINT[@]}" --model tiny --device cpu >"$WORK/serve.log" 2>&1 &
RUN_PID=$!
deadline=$((SECONDS + READY_TIMEOUT_S))
until in_netns "$LCMSERVE" health --target "127.0.0.1:$PORT" --timeout 2 >/dev/null 2>&1; do
  kill -0 "$RUN_PID" 2>/dev/null || { tail -n 30 "$WORK/serve.log"; fail "the server exited while starting"; }
  ((SECONDS < deadline)) || { tail -n 30 "$WORK/serve.log"; fail "not SERVING within ${READY_TIMEOUT_S}s"; }
  sleep 1
done
in_netns "$LCMSERVE" health --target "127.0.0.1:$PORT" --timeout 2
# The server's own process (the edge; it decides the drain): the one listening on the gRPC port.
SERVER_PID=$(in_netns ss -Hltnp "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
[[ -n $SERVER_PID ]] || fail "no process listens on port $PORT"
echo "server pid $SERVER_PID: $(tr '\0' ' ' <"/proc/$SERVER_PID/cmdline")"
echo "as uid $(ps -o uid= -p "$SERVER_PID" | tr -d ' ') (the image's USER $IMAGE_USER)"
ok

step "/models writable by the image's user"
in_netns buildah run --isolation chroot --user "$IMAGE_USER" "$CTR" -- python3 -c '
import os, pathlib
probe = pathlib.Path(os.environ["LCMSERVE_CACHE"]) / "write-probe"
probe.parent.mkdir(parents=True, exist_ok=True)
probe.write_text("ok")
probe.unlink()
print("wrote", probe, "as uid", os.getuid())
'
ok

step "lcmserve generate writes an image"
rm -rf "$WORK/out" && mkdir -p "$WORK/out"
in_netns "$LCMSERVE" generate "a hairline crack in a concrete wall" --target "127.0.0.1:$PORT" \
  --seed 7 --timeout 120 -o "$WORK/out/generated.png"
"$PIP_PYTHON" -c '
import sys
from PIL import Image
with Image.open(sys.argv[1]) as image:
    image.load()
    print(sys.argv[1], image.format, image.size)
' "$WORK/out/generated.png"
ok

step "the Dockerfile's HEALTHCHECK command"
in_netns timeout "$HEALTHCHECK_TIMEOUT" buildah run --isolation chroot --user "$IMAGE_USER" "$CTR" -- \
  "${HEALTHCHECK[@]}"
ok

step "SIGTERM during a request: it finishes, exit 0"
# A request with previews: once the first step's preview is written the request is in flight.
in_netns "$LCMSERVE" generate "a crack in a tiled floor" --target "127.0.0.1:$PORT" --seed 8 \
  --num-images 4 --timeout 120 --retries 0 --previews "$WORK/out/previews" \
  -o "$WORK/out/drained.png" >"$WORK/drain-client.log" 2>&1 &
GEN_PID=$!
deadline=$((SECONDS + 120))
until compgen -G "$WORK/out/previews/*" >/dev/null; do
  kill -0 "$GEN_PID" 2>/dev/null || break
  ((SECONDS < deadline)) || fail "no preview within 120s"
  sleep 0.05
done
kill -0 "$GEN_PID" 2>/dev/null && echo "request in flight; SIGTERM to $SERVER_PID" ||
  echo "the request finished before SIGTERM (previews were too quick to catch); SIGTERM to $SERVER_PID"
kill -TERM "$SERVER_PID"
deadline=$((SECONDS + 120))
while kill -0 "$RUN_PID" 2>/dev/null; do
  ((SECONDS < deadline)) || fail "the server did not exit within 120s of SIGTERM"
  sleep 0.5
done
server_rc=0 && wait "$RUN_PID" || server_rc=$?
RUN_PID="" SERVER_PID=""
client_rc=0 && wait "$GEN_PID" || client_rc=$?
GEN_PID=""
tail -n 5 "$WORK/serve.log"
cat "$WORK/drain-client.log"
((client_rc == 0)) || fail "the request in flight failed (exit $client_rc)"
((server_rc == 0)) || fail "the server exited $server_rc after SIGTERM"
echo "server exit 0; the in-flight request finished ($(ls "$WORK"/out/drained*.png | wc -l) images)"
ok
