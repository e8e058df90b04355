#!/usr/bin/env bash
# damselfly demo: containerd keeps its image blobs in dfdaemon's store, and
# dfdaemon unpacks kubelet's pulls itself.
#
#   sudo scripts/demo.sh [--keep] [--no-build]   run the demo
#   sudo scripts/demo.sh --stop DIR              stop a demo left running by --keep
#
#   --keep      leave the registry, dfdaemon and containerd running at the end
#               and print how to use them and how to stop them
#   --no-build  use target/release/dfdaemon as it is, even if older than the sources
#
# On a Debian 12 machine, as root, this:
#   1. installs what is missing (containerd, docker-registry, skopeo, protoc,
#      zstd, busybox-static) and builds dfdaemon and dfget if they are missing
#      or stale, logging both to /tmp/damselfly-demo-setup.log;
#   2. in a fresh /tmp/dfdemo.XXXXXX: starts a private registry and pushes the
#      `small` test images into it (test-images/push.sh), starts dfdaemon, and
#      starts a private containerd whose content store and CRI snapshotter are
#      dfdaemon ([proxy_plugins] entries of types "content" and "snapshot",
#      built-in store disabled);
#   3. pulls two images with ctr and shows where their blobs went, reads one
#      back through containerd, removes one image and shows containerd's
#      garbage collector deleting its unshared blobs from dfdaemon's store;
#   4. pulls an image as kubelet does (`dfget pull`, CRI PullImage): dfdaemon
#      fetches and unpacks every layer itself (the snapshotter's fast path),
#      and a container started from it with runc reads a file of every layer;
#   5. prints dfdaemon's log and removes everything it made (processes,
#      overlay mounts, the temp dir), on success, failure or Ctrl-C,
#      unless --keep;
#   6. shows the mesh: bench/mesh-rollout.sh with 4 nodes (each a network
#      namespace with its own containerd and dfdaemon; registry and
#      supernode in their own) pulling a 256 MiB image at the same moment,
#      and reports where every piece came from and what the registry sent.
# It exits non-zero if any step fails. Nothing outside the temp dir is
# touched apart from the package installation and the build.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
self=$repo/scripts/$(basename "${BASH_SOURCE[0]}")
bin=$repo/target/release/dfdaemon
dfget=$repo/target/release/dfget
# apt-get's and cargo's output; kept after the demo.
setup_log=/tmp/damselfly-demo-setup.log
ns=demo

# ---------------------------------------------------------------- output helpers

if [[ -t 1 ]]; then bold=$'\e[1m' dim=$'\e[2m' red=$'\e[31m' off=$'\e[0m'; else bold='' dim='' red='' off=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$off"; }
say() {
    local line
    for line in "$@"; do
        if [[ -n $line ]]; then printf '    %s\n' "$line"; else echo; fi
    done
}
indent() { sed 's/^/    /'; }
listing() { sed 's/^/      /'; }
die() {
    printf '%sdemo: %s%s\n' "$red" "$*" "$off" >&2
    exit 1
}
usage() {
    sed -n '4,5p' "$0" >&2
    exit 2
}

# ---------------------------------------------------------------- process and cleanup helpers

# True while PID runs (a zombie waiting for us to reap it does not count).
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z ]]
}

# Stops PID (one of ours: its command line mentions the demo dir) with SIGTERM,
# then SIGKILL after 10 s.
stop_pid() {
    local name=$1 pid=$2 dir=$3 i
    alive "$pid" || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        echo "demo: $name (pid $pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    wait "$pid" 2>/dev/null || true
}

# Stops everything a demo started in DIR and removes DIR. Processes go first
# (containerd before the dfdaemon it talks to), then any mount under DIR
# (containerd's overlayfs snapshotter mounts there while it unpacks), then DIR.
teardown() {
    local dir=$1 name pid mnt
    [[ $dir == /tmp/dfdemo.* && -f $dir/.damselfly-demo ]] || {
        echo "demo: $dir is not a damselfly demo directory; not touching it" >&2
        return 1
    }
    if [[ -f $dir/pids ]]; then
        # Newest first: containerd, dfdaemon, registry.
        while read -r name pid; do
            stop_pid "$name" "$pid" "$dir"
        done < <(tac "$dir/pids")
    fi
    while read -r mnt; do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
    done < <(awk -v p="$dir/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
    if awk -v p="$dir/" 'index($2, p) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        echo "demo: mounts remain under $dir; not removing it" >&2
        return 1
    fi
    rm -rf --one-file-system -- "$dir"
}

# ---------------------------------------------------------------- arguments

keep=false
build=true
while [[ $# -gt 0 ]]; do
    case $1 in
    --keep) keep=true ;;
    --no-build) build=false ;;
    --stop)
        [[ $# -eq 2 ]] || usage
        [[ $EUID -eq 0 ]] || die "run as root (sudo $self --stop $2)"
        teardown "${2%/}" && echo "stopped and removed ${2%/}"
        exit
        ;;
    -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage ;;
    esac
    shift
done

[[ $EUID -eq 0 ]] || die "run as root: sudo $self"

# ---------------------------------------------------------------- 1. prerequisites

step "Checking prerequisites"
apt_updated=false
: >"$setup_log"
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get install $* (output in $setup_log)"
    { $apt_updated || apt-get update; } >>"$setup_log" 2>&1 || die "apt-get update failed; see $setup_log"
    apt_updated=true
    apt-get install -y "$@" >>"$setup_log" 2>&1 || die "apt-get install failed; see $setup_log"
}
missing=()
for cmd in containerd ctr docker-registry skopeo protoc zstd python3 ip tc curl busybox; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    say "missing: ${missing[*]}"
    pkgs=(containerd docker-registry skopeo protobuf-compiler zstd iproute2 curl busybox-static)
    command -v python3 >/dev/null || pkgs+=(python3) # test-images/ needs it
    apt_install "${pkgs[@]}"
    # Debian starts the system containerd on installation; the demo runs its
    # own private one and leaves that one alone.
fi
say "$(containerd --version | cut -d' ' -f1,3)"
# Debian's own python for the small helpers below (a pyenv shim costs 0.5 s a call).
py=$(command -v /usr/bin/python3 || command -v python3)
# ctr would honour these; the demo passes -a and -n and wants the default snapshotter.
unset CONTAINERD_SNAPSHOTTER CONTAINERD_ADDRESS CONTAINERD_NAMESPACE

# dfdaemon is rebuilt when it is missing or older than any source file.
needs_build() {
    [[ -x $bin && -x $dfget ]] || return 0
    local srcs=() p
    for p in src proto build.rs Cargo.toml Cargo.lock; do
        [[ -e $repo/$p ]] && srcs+=("$repo/$p")
    done
    [[ -n $(find "${srcs[@]}" -newer "$bin" -print -quit) ]]
}
if $build && needs_build; then
    # Build as the user who ran sudo when the checkout is theirs, so that
    # target/ does not end up owned by root; cargo is usually in ~/.cargo/bin.
    builder=root
    if [[ -n ${SUDO_USER:-} && $SUDO_USER != root && $(stat -c %U "$repo") == "$SUDO_USER" ]]; then
        builder=$SUDO_USER
    fi
    home=$(getent passwd "$builder" | cut -d: -f6)
    path=$home/.cargo/bin:$PATH
    PATH=$path command -v cargo >/dev/null ||
        die "dfdaemon needs building, and cargo was not found for $builder. Install Rust >= 1.90 with rustup (https://rustup.rs; Debian 12's cargo is too old), then run this again."
    if ! command -v cc >/dev/null; then
        apt_install build-essential # the C compiler cargo links with
    fi
    step "Building dfdaemon and dfget (cargo build --release --locked, as $builder)"
    say "output in $setup_log; this takes a few minutes the first time"
    (cd "$repo" && runuser -u "$builder" -- env PATH="$path" HOME="$home" cargo build --release --locked) \
        >>"$setup_log" 2>&1 || die "cargo build failed; see $setup_log"
fi
[[ -x $bin && -x $dfget ]] || die "$bin or $dfget is missing (run without --no-build to build them)"
say "dfdaemon: $bin" "dfget:    $dfget"

# ---------------------------------------------------------------- the demo dir and its cleanup

dir=$(mktemp -d /tmp/dfdemo.XXXXXX)
touch "$dir/.damselfly-demo"
: >"$dir/pids"
finish() {
    local rc=$?
    trap - EXIT INT TERM HUP
    # Output may be a closed pipe (`demo.sh | head`): never die of SIGPIPE here.
    trap '' PIPE
    set +e
    if $keep && [[ $rc -lt 128 ]]; then
        if [[ $rc -ne 0 ]]; then
            echo "demo: failed; everything is left running as asked (--keep). Logs: $dir/*.log" >&2
            echo "demo: stop it with: sudo $self --stop $dir" >&2
        fi
        exit "$rc"
    fi
    if [[ $rc -ge 128 ]]; then
        echo "demo: interrupted; cleaning up" >&2
    elif [[ $rc -ne 0 ]]; then
        echo >&2
        echo "${red}demo: failed (exit $rc); the last lines of each log:${off}" >&2
        for log in "$dir"/*.log; do
            [[ -s $log ]] || continue
            echo "--- $log" >&2
            tail -n 15 "$log" | cut -c1-300 >&2
        done
    fi
    teardown "$dir" || rc=1
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# Without this, bash would die of SIGPIPE without running the EXIT trap.
trap 'exit 141' PIPE

# Starts a daemon in its own session (so that it outlives the script with
# --keep, and does not share the terminal's signals), logging to DIR/NAME.log.
start() {
    local name=$1
    shift
    setsid "$@" </dev/null >"$dir/$name.log" 2>&1 &
    echo "$name $!" >>"$dir/pids"
    eval "${name//-/_}_pid=$!"
}

# Waits up to 20 s for CHECK (a command) to succeed while daemon NAME runs.
wait_for() {
    local name=$1 pid=$2 i
    shift 2
    for ((i = 0; i < 200; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        alive "$pid" || die "$name exited; see its log below"
        sleep 0.1
    done
    die "$name did not become ready in 20 s"
}

free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- 2. registry, dfdaemon, containerd

step "Starting a private registry and pushing the test images"
port=$(free_port)
registry=127.0.0.1:$port
cat >"$dir/registry.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $dir/registry
http:
  addr: $registry
log:
  level: warn
EOF
start registry docker-registry serve "$dir/registry.yml"
wait_for registry "$registry_pid" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
say "registry at $registry (pid $registry_pid)"
# The images are generated into the demo dir (half a second) rather than
# push.sh's shared cache, so that nothing is left behind.
"$repo/test-images/push.sh" "$registry" small "$dir/images" 2>&1 | indent
catalog=$dir/images/catalog.json

step "Starting dfdaemon"
data=$dir/dfdaemon
df_sock=$dir/dfdaemon.sock
snap_sock=$dir/snapshot.sock
ctd=$dir/containerd
ctd_sock=$dir/containerd.sock
# containerd's registry hosts (CRI's config_path): plain HTTP to ours. dfdaemon
# reads the same directory when it fetches layers itself.
certs=$ctd/certs.d
mkdir -p "$certs/$registry"
printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
    "$registry" "$registry" >"$certs/$registry/hosts.toml"
metrics=127.0.0.1:$(free_port)
start dfdaemon env NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$bin" --data-dir "$data" \
    --content-socket "$df_sock" --snapshot-socket "$snap_sock" --containerd-socket "$ctd_sock" \
    --hosts-dir "$certs" --metrics-listen "$metrics"
wait_for dfdaemon "$dfdaemon_pid" test -S "$snap_sock"
say "dfdaemon (pid $dfdaemon_pid): data dir $data" \
    "  content store socket $df_sock, snapshotter socket $snap_sock, metrics http://$metrics/metrics"

step "Starting a private containerd whose content store and CRI snapshotter are dfdaemon"
cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$ctd/root"
state = "$ctd/state"
# The built-in content store is disabled, so that containerd cannot pick it
# instead of the proxy plugin below.
disabled_plugins = ["io.containerd.content.v1.content"]

[grpc]
  address = "$ctd_sock"
[ttrpc]
  address = "$ctd_sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

# dfdaemon is containerd's content store (not named "content": that name
# belongs to the built-in store) and a snapshotter named "damselfly".
[proxy_plugins]
  [proxy_plugins.damselfly-content]
    type = "content"
    address = "$df_sock"
  [proxy_plugins.damselfly]
    type = "snapshot"
    address = "$snap_sock"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$certs"
  # kubelet's pulls (CRI) unpack into dfdaemon's snapshotter.
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "damselfly"
  # Kept in the demo dir: containerd creates these if they are missing.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$ctd/cni/bin"
    conf_dir = "$ctd/cni/net.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctd/opt"
EOF
start containerd containerd --config "$dir/containerd.toml"
wait_for containerd "$containerd_pid" ctr -a "$ctd_sock" version
say "containerd (pid $containerd_pid): socket $ctd_sock, root $ctd/root"
c() { ctr -a "$ctd_sock" -n "$ns" "$@"; }
plugin=$(c plugins ls | awk '$1 == "io.containerd.content.v1"')
say "its content plugins:" "  $plugin"
[[ $(awk '{print $2, $NF}' <<<"$plugin") == "damselfly-content ok" ]] || die "containerd did not load dfdaemon as its content store"
plugin=$(c plugins ls | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "damselfly"')
say "and its snapshotter:" "  $plugin"
[[ $(awk '{print $NF}' <<<"$plugin") == ok ]] || die "containerd did not load dfdaemon as a snapshotter"

# ---------------------------------------------------------------- 3. pulls

# Prints one line per blob file in dfdaemon's store: size, digest, and what it
# is according to the test images' catalog. With --expect IMAGE..., also
# checks that the store holds exactly the linux/amd64 blobs of those images.
store_report() {
    "$py" - "$catalog" "$data/blobs/sha256" "$@" <<'EOF'
import json, os, sys
catalog, blobdir, *args = sys.argv[1:]
what = {}
for image in json.load(open(catalog)):
    name = image["ref"].split("/", 1)[1]
    for b in image["blobs"]:
        if b.get("platform", "linux/amd64") != "linux/amd64":
            continue
        kind = b["kind"] + (" (" + b["mediaType"].rsplit(".", 1)[-1] + ")" if b["kind"] == "layer" else "")
        what.setdefault(b["digest"], [kind, []])[1].append(name)
have = sorted(os.listdir(blobdir))
for hexd in have:
    kind, images = what.get("sha256:" + hexd, ["?", ["not in the catalog"]])
    size = os.path.getsize(os.path.join(blobdir, hexd))
    shared = "  <- shared" if len(images) > 1 else ""
    print(f"{size:>8}  sha256:{hexd[:12]}…  {kind:<18} {', '.join(images)}{shared}")
if args and args[0] == "--expect":
    want = sorted(d[7:] for d, (_, imgs) in what.items() if set(imgs) & set(args[1:]))
    if want != have:
        print(f"unexpected store content: {len(have)} blobs, expected {len(want)}", file=sys.stderr)
        sys.exit(1)
EOF
}

# The digest of one blob of an image, by kind and media type suffix.
catalog_digest() {
    "$py" - "$catalog" "$1" "$2" "$3" <<'EOF'
import json, sys
catalog, ref, kind, suffix = sys.argv[1:]
for image in json.load(open(catalog)):
    if image["ref"] == ref:
        for b in image["blobs"]:
            if b["kind"] == kind and b["mediaType"].endswith(suffix):
                print(b["digest"]); sys.exit(0)
sys.exit(1)
EOF
}

platform=()
[[ $(dpkg --print-architecture 2>/dev/null || echo amd64) == amd64 ]] || platform=(--platform linux/amd64)
for image in damselfly/multi:v1 damselfly/shared:v1; do
    step "ctr -n $ns image pull --plain-http $registry/$image"
    c image pull --plain-http "${platform[@]}" "$registry/$image" >"$dir/pull.out" 2>&1 || {
        cat "$dir/pull.out"
        die "pull of $image failed"
    }
    # ctr redraws a progress table; keep its last lines.
    grep -E '^(unpacking|done)' "$dir/pull.out" | indent
done

step "Where the blobs went"
say "containerd fetched each blob from the registry and wrote it through dfdaemon's" \
    "socket (Content.Write); dfdaemon checked its digest at commit and renamed it into" \
    "its data dir, which now holds every blob of both images ($data/blobs/sha256):"
store_report --expect multi:v1 shared:v1 | listing
say "" "containerd's own root ($ctd/root) has no content store: its metadata db" \
    "(io.containerd.metadata.v1.bolt) and the unpacked layers (snapshots) only:"
(cd "$ctd/root" && ls -d ./* | sed 's|^\./||' | listing)
[[ ! -e $ctd/root/io.containerd.content.v1.content ]] || die "containerd made its own content store"
[[ -z $(find "$ctd/root" -type d -name blobs) ]] || die "containerd stored blobs in its own root"
say "" "Yet containerd lists them as its content (ctr -n $ns content ls, labels cut):"
c content ls | awk '{ printf "%-74s %s\n", $1, $2 }' | listing

step "Reading a blob back through containerd"
zstd_layer=$(catalog_digest damselfly/multi:v1 layer +zstd)
got=sha256:$(c content get "$zstd_layer" | sha256sum | cut -d' ' -f1)
say "ctr content get $zstd_layer | sha256sum" "  → $got"
[[ $got == "$zstd_layer" ]] || die "the bytes read back do not match their digest"
say "matches: containerd served the zstd layer from dfdaemon's store."

step "ctr -n $ns image rm --sync $registry/damselfly/multi:v1"
c image rm --sync "$registry/damselfly/multi:v1" | indent
# --sync waits for containerd's garbage collector, which lists its content
# store (dfdaemon) and deletes what no image references any more.
for ((i = 0; i < 50; i++)); do
    store_report --expect shared:v1 >/dev/null 2>&1 && break
    sleep 0.1
done
say "--sync waited for containerd's garbage collector: it listed its content store" \
    "(dfdaemon) and deleted every blob no image references any more. multi:v1's own" \
    "blobs are gone from dfdaemon's data dir; the layer it shares with shared:v1 stayed:"
store_report --expect shared:v1 | listing

# ---------------------------------------------------------------- 4. a kubelet-style pull

k8s() { ctr -a "$ctd_sock" -n k8s.io "$@"; }
fast_image=damselfly/multi:v1
fast_layers=5
step "dfget pull $registry/$fast_image   (CRI PullImage, as kubelet pulls)"
say "containerd's CRI unpacker asks its snapshotter, dfdaemon, to Prepare each layer" \
    "under the layer's chain ID. dfdaemon finds the image in its store, fetches every" \
    "layer at once (a blob it already has from its store, the others from the registry" \
    "or, in a mesh, from peers), unpacks them itself and answers that each snapshot" \
    "already exists, so containerd neither fetches nor applies them:" ""
"$dfget" pull "$registry/$fast_image" --containerd "$ctd_sock" --metrics "http://$metrics/metrics" \
    >"$dir/dfget.out" 2>&1 || { indent <"$dir/dfget.out"; die "dfget pull failed"; }
indent <"$dir/dfget.out"
grep -q "dfdaemon fetched and unpacked $fast_layers layers itself" "$dir/dfget.out" &&
    ! grep -q "containerd's own way" "$dir/dfget.out" ||
    die "dfdaemon did not unpack all $fast_layers layers itself"
say "" "dfdaemon's log has a line per layer: where its bytes came from, and the time" \
    "from its first byte fetched to its last byte unpacked (all layers run at once):"
"$py" - "$dir/dfdaemon.log" <<'EOF' | listing
import re, sys
for line in open(sys.argv[1]):
    if "fast path: layer fetched and unpacked" in line:
        f = dict(re.findall(r'(\w+)="?([^" ]+)"?', line.split("fast path: layer fetched and unpacked", 1)[1]))
        print(f"{f['digest'][:19]}…  from {f['source']:<8}  {int(f['tar_bytes']) / 1048576:5.2f} MiB of files in {float(f['seconds']):.2f} s")
EOF
say "" "The image's snapshots, as containerd lists them (ctr -n k8s.io snapshots --snapshotter damselfly ls):"
k8s snapshots --snapshotter damselfly ls | listing

step "ctr -n k8s.io run --snapshotter damselfly $registry/$fast_image … wc -c (a file of every layer)"
busybox=$(command -v busybox)
k8s run --rm --snapshotter damselfly --mount "type=bind,src=$busybox,dst=/bin/busybox,options=rbind:ro" \
    "$registry/$fast_image" damselfly-demo /bin/busybox wc -c /damselfly/multi/tiny.txt \
    /damselfly/multi/gzip/notes.txt /damselfly/multi/zstd/notes.txt /damselfly/multi/tar/notes.txt |
    listing
say "runc started the container on the overlay of dfdaemon's snapshots (busybox bind-mounted" \
    "from the host, as the image has no shell)."

# ---------------------------------------------------------------- 4. the end

if $keep; then
    step "dfdaemon's log so far ($dir/dfdaemon.log)"
    indent <"$dir/dfdaemon.log"
    step "Left running (--keep), all in $dir"
    cat <<EOF
    registry    $registry, pid $registry_pid, log $dir/registry.log
    dfdaemon    pid $dfdaemon_pid, sockets $df_sock and $snap_sock, data dir $data, log $dir/dfdaemon.log
    containerd  pid $containerd_pid, socket $ctd_sock, root $ctd/root, log $dir/containerd.log

    Try:
      ctr -a $ctd_sock -n $ns image ls
      ctr -a $ctd_sock -n $ns image pull --plain-http $registry/damselfly/multi:v1
      $dfget pull $registry/damselfly/shared:v1 --containerd $ctd_sock --metrics http://$metrics/metrics
      ctr -a $ctd_sock -n $ns image pull --plain-http --all-platforms $registry/damselfly/multiarch:v1
      ctr -a $ctd_sock -n $ns content ls
      ls -l $data/blobs/sha256

    Stop it all and remove $dir:
      sudo $self --stop $dir
EOF
    exit 0
fi

step "Stopping containerd and dfdaemon"
# containerd first: it is dfdaemon's client.
stop_pid containerd "$containerd_pid" "$dir"
stop_pid dfdaemon "$dfdaemon_pid" "$dir"
step "dfdaemon's log (its stderr)"
indent <"$dir/dfdaemon.log"

step "The mesh: 4 nodes pull a new 256 MiB image at the same moment"
say "Each node is a network namespace with its own containerd and dfdaemon; the" \
    "registry and the supernode have namespaces of their own (links 1 Gbit/s)." \
    "bench/mesh-rollout.sh builds it, pulls, reports, and removes it all."
"$repo/bench/mesh-rollout.sh" --nodes 4 --mbit 1000 --modes c | indent
say "" "registry egress ~1.00 copies: each layer came from the registry once;" \
    "the other nodes got its pieces from peers and from the supernode's repo."
step "Done; removing $dir"
