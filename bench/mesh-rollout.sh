#!/usr/bin/env bash
# Benchmark: 8 nodes pull a new 256 MiB image at the same moment, every link
# shaped to 200 Mbit/s, up to four ways in one run:
#   (a) direct    each node's containerd (built-in content store) pulls from
#                 the registry;
#   (b) cache     a pull-through cache (docker-registry, proxy.remoteurl =
#                 the registry) in its own namespace; the nodes pull from it;
#   (c) damselfly each node's containerd uses its dfdaemon as content store
#                 (proxy plugin), dfdaemons meshed through one supernode.
#   (d) snapshotter  as (c), and dfdaemon is also the snapshotter (CRI's
#                 default): a kubelet-style CRI pull (`dfget pull`), each
#                 dfdaemon fetching and unpacking every layer itself.
#
#   sudo bench/mesh-rollout.sh [--nodes N] [--mbit M] [--set SET --image REF]
#                              [--modes a,b,c,d] [--keep-logs DIR]
#
#   --nodes N        nodes (default 8)
#   --mbit M         rate of every link, both directions (default 200)
#   --set SET        test-image set (default bench256)
#   --image REF      image of the set (default damselfly/bench256:v1)
#   --modes LIST     which of a,b,c,d to run, in that order (default a,b,c)
#   --keep-logs DIR  copy every log (and the metrics scraped) to DIR
#
# Every node, the registry, the cache and the supernode is a network namespace
# with one veth (eth0) to a bridge that lives in a namespace of its own (so
# the host's firewall never sees the traffic), on a private 10.a.b.0/24 that
# overlaps no route of the machine. Each link is shaped with tbf on both ends
# (as tests/common/netns.rs does). containerd, dfdaemon and every ctr run
# inside their node's namespace (`ip netns exec`): the pull's HTTP happens in
# the ctr process. The page cache is dropped before each mode.
#
# Reported per mode: p50 and max of the nodes' wall times (all pulls start at
# the same instant), the ideal time of one copy of the image over one link,
# max/ideal, the registry's egress in copies of the image (eth0 tx_bytes delta
# of the registry's namespace / image bytes; for the cache mode also the
# cache's egress), and for damselfly the peak RSS of the dfdaemons and of the
# supernode plus where the pieces came from; for (d) also, per node, when its
# last piece arrived and when its last layer was unpacked (dfdaemon's log).
#
# Everything lives in a fresh /tmp/dmr.XXXXXX and is removed on exit, also on
# failure or Ctrl-C: processes, mounts, namespaces. The generated images stay
# cached in /tmp/damselfly-test-images/SET.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
cmdline="$0${*:+ $*}"

nodes=8
mbit=200
set_name=bench256
image=damselfly/bench256:v1
modes=a,b,c
keep_logs=
dfdaemon=$repo/target/release/dfdaemon
supernode=$repo/target/release/supernode
dfget=$repo/target/release/dfget
ns=bench
reg_port=5000
pull_timeout=900

usage() {
    sed -n '14,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --nodes) nodes=${2:?}; shift 2 ;;
    --mbit) mbit=${2:?}; shift 2 ;;
    --set) set_name=${2:?}; shift 2 ;;
    --image) image=${2:?}; shift 2 ;;
    --modes) modes=${2:?}; shift 2 ;;
    --keep-logs) keep_logs=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ $nodes =~ ^[1-9][0-9]?$ && $nodes -le 200 ]] || { echo "--nodes: 1..200" >&2; exit 2; }
[[ $mbit =~ ^[1-9][0-9]*$ ]] || { echo "--mbit must be a positive integer" >&2; exit 2; }
[[ $modes =~ ^[abcd](,[abcd])*$ ]] || { echo "--modes: a comma list of a, b, c, d" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "run as root (sudo $0)" >&2; exit 1; }
for tool in containerd ctr docker-registry skopeo python3 curl ip tc; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
for bin in "$dfdaemon" "$supernode" "$dfget"; do
    [[ -x $bin ]] || { echo "no $bin (cargo build --release)" >&2; exit 1; }
done


# ---------------------------------------------------------------- cleanup ---

tmp=
pids=()       # daemons we started (pid of the process itself: ip netns exec execs)
namespaces=() # created so far, the switch first
prefix=dmr$$


# SIGKILLs whatever still runs in network namespace $1.
kill_all_in() {
    local netns=$1 i p
    for ((i = 0; i < 100; i++)); do
        mapfile -t ps < <(ip netns pids "$netns" 2>/dev/null)
        [[ ${#ps[@]} -eq 0 ]] && return 0
        for p in "${ps[@]}"; do kill -KILL "$p" 2>/dev/null; done
        sleep 0.1
    done
    log "processes survive SIGKILL in $netns: ${ps[*]}"
}

# Unmounts everything under $1 that any process still sees (deepest first).
umount_under() {
    local dir=$1 i m
    for ((i = 0; i < 3; i++)); do
        mapfile -t mounts < <(cat /proc/[0-9]*/mounts 2>/dev/null |
            awk -v p="$dir/" 'index($2, p) == 1 { print $2 }' | sort -ru)
        [[ ${#mounts[@]} -eq 0 ]] && return 0
        for m in "${mounts[@]}"; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        done
    done
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[i]}"
    done
    for ((i = ${#namespaces[@]} - 1; i >= 0; i--)); do
        kill_all_in "${namespaces[i]}"
    done
    wait 2>/dev/null
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ -n $keep_logs ]]; then
            mkdir -p "$keep_logs" && cp -r "$tmp/logs/." "$keep_logs"/ 2>/dev/null &&
                log "logs kept in $keep_logs"
        fi
        umount_under "$tmp"
    fi
    for ((i = ${#namespaces[@]} - 1; i >= 0; i--)); do
        ip netns del "${namespaces[i]}" 2>/dev/null || log "could not delete namespace ${namespaces[i]}"
    done
    [[ -n $tmp && -d $tmp ]] && rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- network ---

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
tree_id="tree $(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$repo" && git diff --quiet HEAD -- src 2>/dev/null || echo ' + local changes in src/')"
dfdaemon_id=$(bin_id "$dfdaemon")
tmp=$(mktemp -d /tmp/dmr.XXXXXX)
chmod 755 "$tmp"
mkdir -p "$tmp/logs" "$tmp/bin"
# Run copies: a rebuild during the run must not change what modes (c), (d) start.
cp "$dfdaemon" "$supernode" "$dfget" "$tmp/bin/"
dfdaemon=$tmp/bin/$(basename "$dfdaemon") supernode=$tmp/bin/$(basename "$supernode")
dfget=$tmp/bin/$(basename "$dfget")
log "work dir $tmp"

# A 10.a.b.0/24 (a in 200..254) that overlaps no route of the root namespace.
subnet=$(ip -j -4 route show table all | python3 -c '
import ipaddress, json, random, sys
routes = [ipaddress.ip_network(r["dst"] if "/" in r["dst"] else r["dst"] + "/32", strict=False)
          for r in json.load(sys.stdin) if r.get("dst") not in (None, "default")]
cands = [ipaddress.ip_network(f"10.{a}.{b}.0/24") for a in range(200, 255) for b in range(256)]
random.seed(int(sys.argv[1]))
random.shuffle(cands)
print(next(str(c.network_address) for c in cands if not any(c.overlaps(r) for r in routes)).rsplit(".", 1)[0])
' $$)
[[ -n $subnet ]] || die "no free 10.x.y.0/24"
switch=$prefix-sw

in_ns() { local netns=$1; shift; ip netns exec "$netns" "$@"; }

add_ns() {
    ip netns add "$1"
    namespaces+=("$1")
    in_ns "$1" bash -c 'for f in /proc/sys/net/ipv6/conf/{all,default}/disable_ipv6; do [ ! -e "$f" ] || echo 1 >"$f"; done'
}

tbf() { # NETNS DEV: token bucket of $mbit, as tests/common/netns.rs
    local bytes_per_sec=$((mbit * 1000000 / 8)) burst
    burst=$((bytes_per_sec * 4 / 1000))
    ((burst < 131072)) && burst=131072
    tc -n "$1" qdisc replace dev "$2" root tbf rate "${mbit}mbit" burst "$burst" latency 50ms
}

hosts=() # name list, index = last octet - 1
# add_host NAME OCTET: namespace $prefix-NAME, eth0 = $subnet.OCTET, shaped.
add_host() {
    local name=$1 octet=$2 netns=$prefix-$1 port=p$2
    add_ns "$netns"
    ip link add name eth0 netns "$netns" type veth peer name "$port" netns "$switch"
    ip -n "$switch" link set dev "$port" master br0 up
    ip -n "$netns" addr add "$subnet.$octet/24" dev eth0
    ip -n "$netns" link set dev eth0 up
    ip -n "$netns" link set dev lo up
    tbf "$netns" eth0
    tbf "$switch" "$port"
    hosts+=("$name")
}

add_ns "$switch"
in_ns "$switch" bash -c 'for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ ! -e "$f" ] || echo 0 >"$f"; done'
ip -n "$switch" link add name br0 type bridge
ip -n "$switch" link set dev br0 up
reg_ip=$subnet.250 cache_ip=$subnet.251 sn_ip=$subnet.252
add_host reg 250
add_host cache 251
add_host sn 252
for ((i = 1; i <= nodes; i++)); do add_host "n$i" "$i"; done
log "net $subnet.0/24: ${#hosts[@]} hosts on bridge br0 in $switch, every link tbf ${mbit} Mbit/s both ways"

tx_bytes() { in_ns "$prefix-$1" cat /sys/class/net/eth0/statistics/tx_bytes; }
rx_bytes() { in_ns "$prefix-$1" cat /sys/class/net/eth0/statistics/rx_bytes; }

# Processes here start inside namespaces, under load: give them 60 s.
wait_seconds=60

# --------------------------------------------------------------- registry ---

registry_config() { # DIR ADDR [REMOTEURL]
    cat <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $1/data
http:
  addr: $2
EOF
    [[ -z ${3:-} ]] || printf 'proxy:\n  remoteurl: %s\n' "$3"
}

mkdir -p "$tmp/reg"
registry_config "$tmp/reg" "0.0.0.0:$reg_port" >"$tmp/reg/config.yml"
in_ns "$prefix-reg" docker-registry serve "$tmp/reg/config.yml" >"$tmp/logs/registry.log" 2>&1 &
pids+=($!)
wait_for registry $! in_ns "$prefix-reg" curl -fsS "http://127.0.0.1:$reg_port/v2/"
log "registry on $reg_ip:$reg_port"

log "pushing set '$set_name' over the registry's loopback (cached in /tmp/damselfly-test-images/$set_name)"
push_out=$(in_ns "$prefix-reg" "$repo/test-images/push.sh" "127.0.0.1:$reg_port" "$set_name" 2>"$tmp/logs/push.log") ||
    { cat "$tmp/logs/push.log" >&2; die "push.sh failed"; }
catalog=$(sed -n 's/^catalog: //p' <<<"$push_out")
[[ -f $catalog ]] || die "push.sh printed no catalog"

mapfile -t blobs < <(image_blobs "$catalog" "$image")
[[ ${#blobs[@]} -gt 0 ]] || die "no blobs for $image in $catalog"
all_digests=() image_bytes=0 nlayers=0
for line in "${blobs[@]}"; do
    read -r kind digest size _ <<<"$line"
    all_digests+=("$digest")
    image_bytes=$((image_bytes + size))
    [[ $kind == layer ]] && nlayers=$((nlayers + 1))
done
log "$image: ${#all_digests[@]} blobs, $nlayers layers, $image_bytes bytes"

# ------------------------------------------------------------- containerd ---


mode_pids=() # daemons of the current mode, stopped at its end

start_daemon() { # NAME HOST LOGFILE COMMAND...: starts in HOST's namespace; sets $started
    local name=$1 host=$2 logf=$3
    shift 3
    ip netns exec "$prefix-$host" "$@" >"$logf" 2>&1 &
    started=$!
    pids+=("$started")
    mode_pids+=("$started")
}

start_containerds() { # MODE EXTRA-TOML [CRI-TOML]: CRI-TOML is appended (tables of the CRI plugin)
    local mode=$1 extra=$2 cri=${3:-} i dir
    for ((i = 1; i <= nodes; i++)); do
        dir=$tmp/$mode/n$i/ctd
        write_containerd_config "$dir" "${extra//@NODE@/n$i}"
        printf '%s\n' "${cri//@NODE@/n$i}" >>"$dir/config.toml"
        start_daemon "containerd n$i" "n$i" "$tmp/logs/$mode-containerd-n$i.log" containerd --config "$dir/config.toml"
    done
    for ((i = 1; i <= nodes; i++)); do
        wait_for "containerd n$i ($mode)" "${mode_pids[-nodes + i - 1]}" \
            ctr -a "$tmp/$mode/n$i/ctd/c.sock" version
    done
    log "$mode: $nodes containerds up"
}

stop_mode() { # MODE: stops the mode's daemons, unmounts and removes its data
    local mode=$1 i
    for ((i = ${#mode_pids[@]} - 1; i >= 0; i--)); do stop_pid "${mode_pids[i]}"; done
    mode_pids=()
    umount_under "$tmp/$mode"
    rm -rf "${tmp:?}/$mode"
}

# The containerd namespace of MODE's pulls: CRI's for (d), ours otherwise.
ns_of() { if [[ $1 == snapshotter ]]; then echo k8s.io; else echo "$ns"; fi; }

# pull_one MODE HOSTPORT I: node I pulls HOSTPORT/$image, output to its log:
# `ctr image pull`, or for (d) a CRI PullImage (`dfget pull`).
pull_one() {
    local mode=$1 source=$2 i=$3 sock=$tmp/$1/n$3/ctd/c.sock
    if [[ $mode == snapshotter ]]; then
        timeout "$pull_timeout" ip netns exec "$prefix-n$i" \
            "$dfget" pull "$source/$image" --containerd "$sock" --metrics "http://$subnet.$i:65003/metrics"
    else
        timeout "$pull_timeout" ip netns exec "$prefix-n$i" \
            ctr -a "$sock" -n "$ns" image pull --plain-http "$source/$image"
    fi
}

# pull_all MODE HOSTPORT: all nodes pull HOSTPORT/$image at the same instant;
# writes "node seconds rc unpack_seconds" lines to $tmp/logs/MODE-times and
# the instant (epoch seconds) to $tmp/logs/MODE-start.
pull_all() {
    local mode=$1 source=$2 start i pull_pids=()
    start=$(awk -v t="$(now)" 'BEGIN { printf "%.3f", t + 1.5 }')
    echo "$start" >"$tmp/logs/$mode-start"
    for ((i = 1; i <= nodes; i++)); do
        (
            sleep "$(awk -v s="$start" -v t="$(now)" 'BEGIN { d = s - t; printf "%.3f", (d > 0 ? d : 0) }')"
            rc=0
            pull_one "$mode" "$source" "$i" >"$tmp/logs/$mode-pull-n$i.log" 2>&1 || rc=$?
            end=$(now)
            # ctr ends with "done: <duration>", the unpack's duration (dfget
            # has none: its unpack runs while the layers arrive).
            unpack=$(sed -n 's/^done: //p' "$tmp/logs/$mode-pull-n$i.log" | tail -n1)
            awk -v s="$start" -v e="$end" -v n="n$i" -v rc="$rc" -v u="${unpack:-?}" \
                'BEGIN { printf "%s %.3f %s %s\n", n, e - s, rc, u }' >"$tmp/logs/$mode-time-n$i"
        ) &
        pull_pids+=($!)
    done
    for i in "${pull_pids[@]}"; do wait "$i" || true; done
    cat "$tmp/logs/$mode"-time-n* >"$tmp/logs/$mode-times"
    local failed
    failed=$(awk '$3 != 0 { print $1 " (rc " $3 ")" }' "$tmp/logs/$mode-times")
    [[ -z $failed ]] || { tail -n 5 "$tmp/logs/$mode"-pull-n*.log >&2; die "$mode: pulls failed on $failed"; }
}
verify_images() { # MODE
    local mode=$1 i out
    for ((i = 1; i <= nodes; i++)); do
        out=$(in_ns "$prefix-n$i" ctr -a "$tmp/$mode/n$i/ctd/c.sock" -n "$(ns_of "$mode")" image check 2>&1) || true
        grep -q 'complete' <<<"$out" || die "$mode: image not complete on n$i: $out"
    done
}

hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

# run_mode MODE SOURCE-HOSTPORT: counters around one concurrent pull.
run_mode() {
    local mode=$1 source=$2 h
    drop_caches
    echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$tmp/logs/$mode-load-before"
    for h in reg cache sn; do
        echo "$(tx_bytes $h) $(rx_bytes $h)" >"$tmp/logs/$mode-$h-bytes0"
    done
    log "$mode: $nodes nodes pull $source/$image (load ${load_now:-$(cut -d' ' -f1-3 /proc/loadavg)})"
    pull_all "$mode" "$source"
    for h in reg cache sn; do
        echo "$(tx_bytes $h) $(rx_bytes $h)" >"$tmp/logs/$mode-$h-bytes1"
    done
    echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$tmp/logs/$mode-load-after"
    verify_images "$mode"
    log "$mode: done: $(sort -k2 -n "$tmp/logs/$mode-times" | awk '{ printf "%s %ss  ", $1, $2 }')"
}

# start_mesh MODE [DFDAEMON-ARG...]: the supernode and one dfdaemon per node
# (its own args after DFDAEMON-ARGs, @NODE@ in them replaced by the node's
# name); sets sn_pid and df_pids.
start_mesh() {
    local mode=$1 i a args
    shift
    mkdir -p "$tmp/$mode/sn"
    start_daemon supernode sn "$tmp/logs/$mode-supernode.log" \
        "$supernode" --data-dir "$tmp/$mode/sn/data" --listen "$sn_ip:8002" \
        --advertise-ip "$sn_ip" --metrics-listen "$sn_ip:8003"
    sn_pid=$started
    wait_for supernode "$sn_pid" in_ns "$prefix-sn" curl -fsS "http://$sn_ip:8003/metrics"
    df_pids=()
    for ((i = 1; i <= nodes; i++)); do
        args=()
        for a in "$@"; do args+=("${a//@NODE@/n$i}"); done
        mkdir -p "$tmp/$mode/n$i/df"
        start_daemon "dfdaemon n$i" "n$i" "$tmp/logs/$mode-dfdaemon-n$i.log" \
            "$dfdaemon" --data-dir "$tmp/$mode/n$i/df/data" \
            --content-socket "$tmp/$mode/n$i/df/df.sock" \
            --supernode "$sn_ip:8002" --advertise-ip "$subnet.$i" --upload-port 65002 \
            --metrics-listen "$subnet.$i:65003" "${args[@]}"
        df_pids+=("$started")
    done
    for ((i = 1; i <= nodes; i++)); do
        wait_for "dfdaemon n$i" "${df_pids[i - 1]}" test -S "$tmp/$mode/n$i/df/df.sock"
        wait_for "dfdaemon n$i metrics" "${df_pids[i - 1]}" \
            in_ns "$prefix-n$i" curl -fsS "http://$subnet.$i:65003/metrics"
    done
    log "$mode: supernode (pid $sn_pid) and $nodes dfdaemons up"
}

# run_mesh_mode MODE: the pull of a mesh mode, with the nodes' link bytes
# around it; then checks that every blob is in each dfdaemon's store and
# that no containerd has a content store of its own, and records metrics,
# peak RSS and CPU seconds (supernode, dfdaemons, containerds).
run_mesh_mode() {
    local mode=$1 i d p h rss_df_max=0
    for ((i = 1; i <= nodes; i++)); do
        echo "$(tx_bytes "n$i") $(rx_bytes "n$i")" >"$tmp/logs/$mode-n$i-bytes0"
    done
    run_mode "$mode" "$reg_ip:$reg_port"
    for ((i = 1; i <= nodes; i++)); do
        echo "$(tx_bytes "n$i") $(rx_bytes "n$i")" >"$tmp/logs/$mode-n$i-bytes1"
        for d in "${all_digests[@]}"; do
            [[ -f $tmp/$mode/n$i/df/data/blobs/sha256/${d#sha256:} ]] ||
                die "$mode: $d not in n$i's dfdaemon store"
        done
        [[ ! -e $tmp/$mode/n$i/ctd/root/io.containerd.content.v1.content ]] ||
            die "$mode: n$i's containerd has a content store of its own"
        in_ns "$prefix-n$i" curl -fsS "http://$subnet.$i:65003/metrics" >"$tmp/logs/$mode-dfdaemon-n$i.metrics" || true
    done
    in_ns "$prefix-sn" curl -fsS "http://$sn_ip:8003/metrics" >"$tmp/logs/$mode-supernode.metrics" || true
    for p in "${df_pids[@]}"; do
        h=$(hwm_kib "$p")
        echo "$h" >>"$tmp/logs/$mode-dfdaemon-hwm-kib-all"
        ((h > rss_df_max)) && rss_df_max=$h
    done
    echo "$rss_df_max" >"$tmp/logs/$mode-dfdaemon-hwm-kib"
    for p in "${mode_pids[@]}"; do
        awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f\n", ($14 + $15) / hz }' "/proc/$p/stat"
    done >"$tmp/logs/$mode-cpu"
    hwm_kib "$sn_pid" >"$tmp/logs/$mode-supernode-hwm-kib"
    awk '/^VmRSS:/ { print $2 }' "/proc/$sn_pid/status" >"$tmp/logs/$mode-supernode-rss-kib"
}

# ------------------------------------------------------------------ modes ---

content_proxy="disabled_plugins = [\"io.containerd.content.v1.content\"]

[proxy_plugins]
  [proxy_plugins.damselfly-content]
    type = \"content\"
    address = \"$tmp/@MODE@/@NODE@/df/df.sock\""

IFS=, read -ra mode_list <<<"$modes"
for m in "${mode_list[@]}"; do
    case $m in
    a)
        start_containerds direct ""
        run_mode direct "$reg_ip:$reg_port"
        stop_mode direct
        ;;
    b)
        mkdir -p "$tmp/cache"
        registry_config "$tmp/cache" "0.0.0.0:$reg_port" "http://$reg_ip:$reg_port" >"$tmp/cache/config.yml"
        start_daemon cache cache "$tmp/logs/cache.log" docker-registry serve "$tmp/cache/config.yml"
        wait_for cache "$started" in_ns "$prefix-cache" curl -fsS "http://127.0.0.1:$reg_port/v2/"
        start_containerds cache ""
        run_mode cache "$cache_ip:$reg_port"
        stop_mode cache
        rm -rf "$tmp/cache"
        ;;
    c)
        start_mesh damselfly
        start_containerds damselfly "${content_proxy//@MODE@/damselfly}"
        run_mesh_mode damselfly
        stop_mode damselfly
        ;;
    d)
        # CRI reads the registry's hosts.toml (plain HTTP) from certs.d, and
        # so does each dfdaemon's fast path.
        for ((i = 1; i <= nodes; i++)); do
            mkdir -p "$tmp/snapshotter/n$i/ctd/certs.d/$reg_ip:$reg_port"
            printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
                "$reg_ip:$reg_port" "$reg_ip:$reg_port" >"$tmp/snapshotter/n$i/ctd/certs.d/$reg_ip:$reg_port/hosts.toml"
        done
        start_mesh snapshotter \
            --snapshot-socket "$tmp/snapshotter/@NODE@/df/snap.sock" \
            --containerd-socket "$tmp/snapshotter/@NODE@/ctd/c.sock" \
            --hosts-dir "$tmp/snapshotter/@NODE@/ctd/certs.d"
        start_containerds snapshotter "${content_proxy//@MODE@/snapshotter}
  [proxy_plugins.damselfly]
    type = \"snapshot\"
    address = \"$tmp/snapshotter/@NODE@/df/snap.sock\"" \
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]
  config_path = \"$tmp/snapshotter/@NODE@/ctd/certs.d\"
[plugins.\"io.containerd.grpc.v1.cri\".containerd]
  snapshotter = \"damselfly\""
        run_mesh_mode snapshotter
        stop_mode snapshotter
        ;;
    esac
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ----------------------------------------------------------------- report ---

report=$(python3 - "$tmp/logs" "$image_bytes" "$mbit" "$nodes" "$modes" <<'EOF'
import datetime, os, re, statistics, sys
logs, image_bytes, mbit, nodes, modes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")
MiB = 1 << 20
ideal = image_bytes * 8 / (mbit * 1e6)
names = {"a": "direct", "b": "cache", "c": "damselfly", "d": "snapshotter"}
label = {"direct": "(a) direct from the registry", "cache": "(b) pull-through cache",
         "damselfly": "(c) damselfly content store",
         "snapshotter": "(d) damselfly content store + snapshotter, CRI pull"}
# Issue 3's targets for (c), issue 7's for (d): slowest node / one-copy time,
# registry copies, dfdaemon peak RSS MiB.
targets = {"damselfly": (1.3, 1.1, 64, "issue 3"), "snapshotter": (1.3, 1.05, 64, "issue 7")}

def read(path):
    with open(os.path.join(logs, path)) as f:
        return f.read().split()

def delta(mode, host, i):
    return int(read(f"{mode}-{host}-bytes1")[i]) - int(read(f"{mode}-{host}-bytes0")[i])

def times(mode):
    rows = [l.split() for l in open(os.path.join(logs, f"{mode}-times"))]
    rows.sort(key=lambda r: int(r[0][1:]))
    return rows

def go_secs(d):  # a Go duration as ctr prints it: 1m2.5s, 3.2s, 176.4ms
    if d == "?":
        return "?"
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)(ms|µs|us|ns|s|m|h)", d):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}[unit]
    return f"{total:.2f}"

def log_lines(mode, i):
    return open(os.path.join(logs, f"{mode}-dfdaemon-n{i}.log"), errors="replace").read().splitlines()

def stamp(line):  # seconds since the epoch of a dfdaemon log line
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()

def samples(mode, i, name):  # {label value: count} of a labelled counter in a node's metrics
    path = os.path.join(logs, f"{mode}-dfdaemon-n{i}.metrics")
    text = open(path).read() if os.path.exists(path) else ""
    return {m.group(1): int(float(m.group(2)))
            for m in re.finditer(rf'^damselfly_{name}_total{{\w+="([^"]*)"}} (\S+)$', text, re.M)}

out = []
out.append(f"One copy of the image over one {mbit} Mbit/s link (ideal): {image_bytes} B × 8 / {mbit}e6 = **{ideal:.2f} s**")
out.append("")
out.append("| mode | p50 node s | max node s | max / ideal | registry egress (copies) | cache egress (copies) | load before → after |")
out.append("|---|---|---|---|---|---|---|")
per_node = []
fetch_rows = []
for m in modes:
    mode = names[m]
    rows = times(mode)
    t = [float(r[1]) for r in rows]
    reg = delta(mode, "reg", 0) / image_bytes
    cache = f"{delta(mode, 'cache', 0) / image_bytes:.2f}" if mode == "cache" else "–"
    lb, la = " ".join(read(f"{mode}-load-before")), " ".join(read(f"{mode}-load-after"))
    out.append(f"| {label[mode]} | {statistics.median(t):.2f} | {max(t):.2f} | {max(t) / ideal:.2f} | "
               f"{reg:.2f} | {cache} | {lb} → {la} |")
    per_node.append(f"| {mode} | " + " | ".join(f"{float(r[1]):.2f} ({go_secs(r[3])})" for r in rows) + " |")
    unpack = [float(go_secs(r[3])) for r in rows if go_secs(r[3]) != "?"]
    if unpack and len(unpack) == len(rows):
        fetch = [float(r[1]) - u for r, u in zip(rows, unpack)]
        fetch_rows.append(f"| {label[mode]} | {statistics.median(fetch):.2f} | {max(fetch):.2f} | "
                          f"{max(fetch) / ideal:.2f} | {statistics.median(unpack):.2f} | {max(unpack):.2f} |")
if fetch_rows:
    out.append("")
    out.append("Fetch phase only, for the `ctr image pull` modes (each node's wall time minus ctr's `done:` figure, the unpack; what the distribution itself took):")
    out.append("")
    out.append("| mode | p50 fetch s | max fetch s | max fetch / ideal | p50 unpack s | max unpack s |")
    out.append("|---|---|---|---|---|---|")
    out += fetch_rows
out.append("")
out.append("Per node: wall time s (in parentheses ctr's own `done:` figure, the unpack's duration; `?` for the CRI pull, whose unpack runs while the layers arrive):")
out.append("")
out.append("| mode | " + " | ".join(f"n{i}" for i in range(1, nodes + 1)) + " |")
out.append("|---|" + "---|" * nodes)
out += per_node

for m in [m for m in modes if names[m] in targets]:
    mode = names[m]
    df = int(read(f"{mode}-dfdaemon-hwm-kib")[0]) / 1024
    hwms = [int(x) / 1024 for x in read(f"{mode}-dfdaemon-hwm-kib-all")]
    sn = int(read(f"{mode}-supernode-hwm-kib")[0]) / 1024
    snr = int(read(f"{mode}-supernode-rss-kib")[0]) / 1024
    out.append("")
    out.append(f"#### {label[mode]}")
    out.append("")
    out.append("| process | value |")
    out.append("|---|---|")
    out.append(f"| dfdaemon peak RSS, max VmHWM over {nodes} | **{df:.1f} MiB** (all: {' '.join(f'{h:.0f}' for h in hwms)}) |")
    out.append(f"| supernode peak RSS (VmHWM) / RSS at the end | {sn:.1f} / {snr:.1f} MiB |")
    out.append(f"| supernode eth0 tx during the pull | {delta(mode, 'sn', 0) / MiB:.1f} MiB |")
    cpu = [float(x) for x in read(f"{mode}-cpu")]  # supernode, dfdaemons, containerds
    out.append(f"| CPU s (user+sys): supernode / {nodes} dfdaemons / {nodes} containerds | "
               f"{cpu[0]:.1f} / {sum(cpu[1:1 + nodes]):.1f} / {sum(cpu[1 + nodes:]):.1f} |")
    out.append("")
    out.append("Where each node's pieces came from (dfdaemon log lines `downloading piece … source=`), its link's bytes, and the mesh events in its log:")
    out.append("")
    out.append("| node | pieces from peers | from the supernode's repo | from registry | rx MiB | tx MiB | downloading from peers | ingesting from the registry | took over | mesh stalled |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(1, nodes + 1):
        lines = log_lines(mode, i)
        piece = [l for l in lines if "downloading piece" in l]
        peer = sum(1 for l in piece if re.search(r'source="?peer', l))
        regp = sum(1 for l in piece if re.search(r'source="?registry', l))
        supp = sum(1 for l in piece if re.search(r'source="?supernode', l))
        c = lambda s: sum(1 for l in lines if s in l)
        tx = delta(mode, f"n{i}", 0) / MiB
        rx = delta(mode, f"n{i}", 1) / MiB
        out.append(f"| n{i} | {peer} | {supp} | {regp} | {rx:.0f} | {tx:.0f} | {c('downloading from peers')} | "
                   f"{c('ingesting from the registry')} | {c('elected to take over')} | {c('mesh download stalled')} |")
    if mode == "snapshotter":
        start = float(read("snapshotter-start")[0])
        out.append("")
        out.append("Where the time of each CRI pull went, in seconds from the common start (dfdaemon's log): the fast path's start "
                   "(its first Prepare), the last piece in (fetch end), the last layer unpacked (`fast path: layer fetched and "
                   "unpacked`), and the CRI pull's end; the unpack tail is last unpacked − last piece. Then the layers dfdaemon "
                   "unpacked by source and the Prepares it declined (its metrics):")
        out.append("")
        out.append("| node | fast path start | last piece in | last layer unpacked | CRI pull done | unpack tail s | unpacked by source | declined |")
        out.append("|---|---|---|---|---|---|---|---|")
        for i, row in zip(range(1, nodes + 1), times(mode)):
            lines = log_lines(mode, i)
            at = lambda pat: [stamp(l) - start for l in lines if pat in l]
            began, pieces, unpacked = at("fast path: fetching and unpacking"), at("downloading piece"), at("layer fetched and unpacked")
            f = lambda xs, pick: f"{pick(xs):.2f}" if xs else "–"
            tail = f"{max(unpacked) - max(pieces):.2f}" if unpacked and pieces else "–"
            by = samples(mode, i, "dfdaemon_unpacked_layers")
            declined = samples(mode, i, "dfdaemon_fast_path_declined")
            out.append(f"| n{i} | {f(began, min)} | {f(pieces, max)} | {f(unpacked, max)} | {float(row[1]):.2f} | {tail} | "
                       f"{' '.join(f'{k} {v}' for k, v in sorted(by.items())) or 'none'} | "
                       f"{' '.join(f'{k} {v}' for k, v in sorted(declined.items())) or 'none'} |")

    slow, copies, rss, issue = targets[mode]
    mx = max(float(r[1]) for r in times(mode))
    reg = delta(mode, "reg", 0) / image_bytes
    ok = lambda b: "**met**" if b else "**MISSED**"
    out.append("")
    out.append(f"Targets ({issue}), for {label[mode]}:")
    out.append("")
    out.append(f"- slowest node ≤ {slow} × one-copy time ({slow * ideal:.2f} s): {mx:.2f} s = {mx / ideal:.2f} × → {ok(mx <= slow * ideal)}")
    out.append(f"- registry egress ≤ {copies} copies: {reg:.2f} → {ok(reg <= copies)}")
    out.append(f"- dfdaemon peak RSS ≤ {rss} MiB: {df:.1f} MiB → {ok(df <= rss)}")
print("\n".join(out))
EOF
)

mem=$(free -g | awk '/^Mem:/ { print $2 " GiB total, " $7 " GiB available" }')
cat <<EOF

## mesh-rollout.sh: $nodes nodes, $mbit Mbit/s links, $(awk -v b="$image_bytes" 'BEGIN { printf "%.0f", b / 1048576 }') MiB image

- command: \`$cmdline\`
- date: $(date -u +%Y-%m-%dT%H:%MZ); dfdaemon $dfdaemon_id; $tree_id; $(containerd --version | awk '{print $1 " " $3}'); docker-registry $(docker-registry --version | awk '{print $3}')
- machine: $(nproc) CPUs, $mem, kernel $(uname -r); load average before $load_before, after $load_after
- image: \`$image\` (set \`$set_name\`): ${#all_digests[@]} blobs, $nlayers layers, $image_bytes bytes
- setup: every node, the registry, the cache and the supernode in its own network namespace on one bridge ($subnet.0/24), every link tbf $mbit Mbit/s in both directions; containerd, dfdaemon and ctr inside the node's namespace; each mode with fresh containerds (and dfdaemons/supernode/cache), page cache dropped before it; all $nodes pulls (\`ctr image pull --plain-http\`; for (d) a CRI PullImage, \`dfget pull\`) started at the same instant, node time = start → its client exits (fetch + unpack)

$report
EOF
