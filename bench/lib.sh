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

# write_containerd_config DIR EXTRA: DIR/config.toml for a private containerd
# with everything under DIR; EXTRA is top-level TOML (a proxy plugin, say).
write_containerd_config() {
    local dir=$1 extra=$2
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
  [plugins."io.containerd.internal.v1.opt"]
    path = "$dir/opt"
TOML
}
