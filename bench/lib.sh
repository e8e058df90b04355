# Helpers the benchmark scripts share; `source "$here/lib.sh"` after setting
# `here` to bench/. Defines functions only.

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# stop_pid PID: SIGTERM, up to 5 s of grace, then SIGKILL; reaps it.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# write_containerd_config DIR EXTRA [CRI]: DIR/config.toml for a private
# containerd with everything under DIR; EXTRA is top-level TOML (a proxy
# plugin, say), CRI is TOML inside CRI's table (its sub-tables).
write_containerd_config() {
    local dir=$1 extra=$2 cri=${3:-}
    mkdir -p "$dir"
    cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
$extra

[grpc]
  address = "$dir/c.sock"

[ttrpc]
  address = "$dir/c.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_port = "0"
$cri
  [plugins."io.containerd.internal.v1.opt"]
    path = "$dir/opt"
TOML
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for WHAT PID COMMAND...: polls COMMAND for up to $wait_seconds
# (default 30) while PID lives.
wait_for() {
    local what=$1 pid=$2 i limit=${wait_seconds:-30}
    shift 2
    for ((i = 0; i < limit * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || die "$what exited during startup (see its log)"
        sleep 0.1
    done
    die "$what did not come up in $limit s"
}

# unmount_under DIR: the overlay (and any other) mounts left under DIR,
# deepest first.
unmount_under() {
    local dir=$1 i m mounts
    for ((i = 0; i < 3; i++)); do
        mapfile -t mounts < <(awk -v p="$dir/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
        [[ ${#mounts[@]} -eq 0 ]] && break
        for m in "${mounts[@]}"; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        done
    done
}

hwm_mib() { # VmHWM of PID in MiB
    awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}

cpu_s() { # user + system CPU seconds of PID so far
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat"
}

# start_registry DIR LOG: a docker-registry on a free loopback port with its
# data in DIR, logging to LOG; sets `registry` (HOST:PORT) and adds its pid to
# `pids`.
start_registry() {
    local dir=$1 log=$2 port
    port=$(free_port)
    registry=127.0.0.1:$port
    mkdir -p "$dir"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: $registry
EOF
    docker-registry serve "$dir/config.yml" >"$log" 2>&1 &
    pids+=($!)
    wait_for registry $! curl -fsS "http://$registry/v2/"
    log "registry on $registry"
}

# push_set SET LOG: pushes test-image set SET to $registry (generated once,
# cached in /tmp/damselfly-test-images/SET); prints its catalog's path.
push_set() {
    local set=$1 log=$2 out catalog
    log "pushing set '$set' (generated once, cached in /tmp/damselfly-test-images/$set)"
    out=$("$repo/test-images/push.sh" "$registry" "$set" 2>"$log") ||
        { cat "$log" >&2; die "push.sh failed"; }
    catalog=$(sed -n 's/^catalog: //p' <<<"$out")
    [[ -f $catalog ]] || die "push.sh printed no catalog"
    echo "$catalog"
}

# image_blobs CATALOG IMAGE: the blobs a single-platform pull of IMAGE
# fetches, one line each: KIND DIGEST SIZE MEDIATYPE.
image_blobs() {
    python3 - "$1" "$2" <<'EOF'
import json, platform, sys
arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
images = [i for i in json.load(open(sys.argv[1])) if i["ref"] == sys.argv[2]]
if not images:
    sys.exit(f"{sys.argv[2]} is not in {sys.argv[1]}")
seen = set()
for b in images[0]["blobs"]:
    p = b.get("platform")
    if p is not None and p.split("/")[:2] != ["linux", arch]:
        continue
    if b["digest"] not in seen:
        seen.add(b["digest"])
        print(b["kind"], b["digest"], b["size"], b["mediaType"])
EOF
}

# "<version>, built <time>" of binary $1. Read it before a run: a rebuild
# during the run replaces the file, not the running process.
bin_id() {
    echo "$("$1" --version | awk '{print $2}'), $(date -u -r "$1" +'built %Y-%m-%dT%H:%MZ')"
}

# "tree <commit>", plus " + local changes" if the work tree at $1 has any.
tree_id() {
    echo "tree $(cd "$1" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$1" && git diff --quiet HEAD 2>/dev/null || echo ' + local changes')"
}

# EXIT trap of a one-node benchmark: stops every pid in $pids (last started
# first), copies $tmp's logs to $keep_logs if set, unmounts what is mounted
# under $tmp and removes it; exits with the script's status.
cleanup_run() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[i]}"
    done
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ -n $keep_logs ]]; then
            mkdir -p "$keep_logs" && cp "$tmp"/*.log "$keep_logs"/ 2>/dev/null
        fi
        unmount_under "$tmp"
        rm -rf "$tmp"
    fi
    exit "$rc"
}
