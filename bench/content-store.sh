#!/usr/bin/env bash
# Benchmark: containerd's built-in content store (A) vs. dfdaemon as
# containerd's content store through a [proxy_plugins] entry (B).
#
#   sudo bench/content-store.sh [--set SET] [--image REF] [--rounds N]
#                               [--split] [--dfdaemon PATH] [--keep-logs DIR]
#
#   --set SET        test-image set to push (default: bench, ~1 GiB, 4 layers)
#   --image REF      image of the set to pull (default: damselfly/bench:v1)
#   --rounds N       measured rounds per store (default: 3)
#   --split          also time the pull's two halves apart, each cold: fetch
#                    only (ctr content fetch), then unpack only (ctr image pull
#                    with all content present); adds ~60% to the run time
#   --dfdaemon PATH  dfdaemon binary (default: target/release/dfdaemon)
#   --keep-logs DIR  copy the logs of every process to DIR before cleaning up
#
# One run starts a private registry (docker-registry) on a free loopback port,
# pushes the set with test-images/push.sh, and starts two containerd instances
# side by side, A with the built-in store, B with dfdaemon. Each round, for A
# and for B (alternating which goes first), it removes the image (ctr image rm
# --sync, checking that no content or snapshot is left), drops the page cache,
# and times `ctr image pull` (fetch + unpack); then it times reading every
# layer back with `ctr content get` (hot: right after the pull, no drop);
# with --split, then fetch and unpack apart.
# At the end it prints medians, minima, throughput, ratios B/A and the peak
# RSS (VmHWM) of dfdaemon and of both containerds, as a Markdown table.
#
# Everything lives in a fresh directory under /tmp and is removed on exit
# (also on failure or Ctrl-C); the generated images stay cached in
# /tmp/damselfly-test-images/SET.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
cmdline="$0${*:+ $*}"

set_name=bench
image=damselfly/bench:v1
rounds=3
dfdaemon=$repo/target/release/dfdaemon
keep_logs=
split=0
ns=bench

usage() {
    sed -n '5,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --set) set_name=${2:?}; shift 2 ;;
    --image) image=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    --dfdaemon) dfdaemon=${2:?}; shift 2 ;;
    --keep-logs) keep_logs=${2:?}; shift 2 ;;
    --split) split=1; shift ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "run as root (sudo $0)" >&2; exit 1; }
for tool in containerd ctr docker-registry skopeo python3 curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
[[ -x $dfdaemon ]] || { echo "no dfdaemon at $dfdaemon (cargo build --release)" >&2; exit 1; }


# ---------------------------------------------------------------- cleanup ---

tmp=
pids=() # everything we started, stopped in reverse order


trap cleanup_run EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------------ setup ---

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
dfdaemon_id="$(bin_id "$dfdaemon"); $(tree_id "$repo")"
tmp=$(mktemp -d /tmp/dfb.XXXXXX)
chmod 755 "$tmp"
mkdir -p "$tmp/reg" "$tmp/a" "$tmp/b" "$tmp/df"
log "work dir $tmp"

start_registry "$tmp/reg" "$tmp/registry.log"
catalog=$(push_set "$set_name" "$tmp/push.log")

# The blobs a single-platform pull of $image fetches, and its layers.
# Lines: KIND DIGEST SIZE MEDIATYPE
mapfile -t blobs < <(image_blobs "$catalog" "$image")
[[ ${#blobs[@]} -gt 0 ]] || die "no blobs for $image in $catalog"
all_digests=() layer_digests=() pull_bytes=0 read_bytes=0
for line in "${blobs[@]}"; do
    read -r kind digest size _ <<<"$line"
    all_digests+=("$digest")
    pull_bytes=$((pull_bytes + size))
    if [[ $kind == layer ]]; then
        layer_digests+=("$digest")
        read_bytes=$((read_bytes + size))
    fi
done
log "$image: ${#all_digests[@]} blobs, ${#layer_digests[@]} layers, $pull_bytes bytes"


start_containerd() {
    local name=$1 dir=$2
    containerd --config "$dir/config.toml" >"$tmp/containerd-$name.log" 2>&1 &
    pids+=($!)
    eval "ctd_pid_$name=$!"
    wait_for "containerd $name" $! ctr -a "$dir/c.sock" version
    log "containerd $name up (pid $!)"
}

# A: built-in store.
write_containerd_config "$tmp/a" ""
start_containerd A "$tmp/a"

# B: dfdaemon as the content store.
dfsock=$tmp/df/df.sock
"$dfdaemon" --data-dir "$tmp/df/data" --content-socket "$dfsock" >"$tmp/dfdaemon.log" 2>&1 &
dfdaemon_pid=$!
pids+=($dfdaemon_pid)
wait_for dfdaemon $dfdaemon_pid test -S "$dfsock"
log "dfdaemon up (pid $dfdaemon_pid)"
write_containerd_config "$tmp/b" "disabled_plugins = [\"io.containerd.content.v1.content\"]

[proxy_plugins]
  [proxy_plugins.damselfly]
    type = \"content\"
    address = \"$dfsock\""
start_containerd B "$tmp/b"

sock_A=$tmp/a/c.sock
sock_B=$tmp/b/c.sock
ref=$registry/$image

# -------------------------------------------------------------- measuring ---


# Content of the image still known to containerd X (count of the image's blobs).
content_left() {
    local sock=$1 d n=0 listed
    listed=$(ctr -a "$sock" -n $ns content ls -q 2>/dev/null || true)
    for d in "${all_digests[@]}"; do
        grep -qx "$d" <<<"$listed" && n=$((n + 1))
    done
    echo $n
}

make_cold() {
    local name=$1 sock=$2 left snaps
    ctr -a "$sock" -n $ns image rm --sync "$ref" >/dev/null 2>&1 || true
    left=$(content_left "$sock")
    snaps=$(ctr -a "$sock" -n $ns snapshots ls 2>/dev/null | tail -n +2 | wc -l)
    [[ $left == 0 && $snaps == 0 ]] ||
        die "$name not cold after image rm --sync: $left blobs, $snaps snapshots left"
    if [[ $name == B ]]; then
        local d
        for d in "${all_digests[@]}"; do
            [[ ! -e $tmp/df/data/blobs/sha256/${d#sha256:} ]] ||
                die "B: $d still in dfdaemon's blobs/ after image rm --sync"
        done
    fi
}

# timed NAME KIND CTR-ARGS...: drops the page cache, runs ctr on NAME's
# containerd and appends the wall time to $tmp/results-NAME-KIND.
timed() {
    local name=$1 kind=$2 sock_var=sock_$1 t0 t1
    shift 2
    drop_caches
    t0=$(now)
    ctr -a "${!sock_var}" -n $ns "$@" >>"$tmp/pull-$name.log" 2>&1 ||
        { tail -n 20 "$tmp/pull-$name.log" >&2; die "$kind on $name failed: ctr $*"; }
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }' >>"$tmp/results-$name-$kind"
}

time_read() {
    local name=$1 sock=$2 t0 t1 d
    t0=$(now)
    for d in "${layer_digests[@]}"; do
        ctr -a "$sock" -n $ns content get "$d" >/dev/null ||
            die "content get $d on $name failed"
    done
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }' >>"$tmp/results-$name-read"
}

verify_b() {
    local d
    for d in "${all_digests[@]}"; do
        [[ -f $tmp/df/data/blobs/sha256/${d#sha256:} ]] ||
            die "B: $d is not in dfdaemon's $tmp/df/data/blobs/sha256/"
    done
    [[ ! -e $tmp/b/root/io.containerd.content.v1.content ]] ||
        die "B: containerd has its own content store ($tmp/b/root/io.containerd.content.v1.content)"
    [[ -d $tmp/a/root/io.containerd.content.v1.content ]] ||
        die "A: no built-in content store under $tmp/a/root"
    log "B verified: all ${#all_digests[@]} blobs in dfdaemon's blobs/sha256/, no io.containerd.content.v1.content in B's root"
}

log "measuring $rounds round(s); page cache dropped before each pull; reads are hot (right after the pull)"
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then order=(A B); else order=(B A); fi
    for name in "${order[@]}"; do
        sock_var=sock_$name
        sock=${!sock_var}
        make_cold "$name" "$sock"
        timed "$name" pull image pull --plain-http "$ref"
        [[ $name == B && $r == 1 ]] && verify_b
        time_read "$name" "$sock"
        msg="pull $(tail -n1 "$tmp/results-$name-pull") s, read $(tail -n1 "$tmp/results-$name-read") s"
        if ((split)); then
            make_cold "$name" "$sock"
            timed "$name" fetch content fetch --plain-http "$ref"
            # Content fetched without an image is held by nothing: make sure
            # GC did not take it, or the "unpack" would fetch again.
            [[ $(content_left "$sock") == "${#all_digests[@]}" ]] ||
                die "$name: content fetched by ctr content fetch is gone before the unpack"
            timed "$name" unpack image pull --plain-http "$ref"
            msg+=", fetch only $(tail -n1 "$tmp/results-$name-fetch") s, unpack only $(tail -n1 "$tmp/results-$name-unpack") s"
        fi
        log "round $r $name: $msg"
    done
done

rss_dfdaemon=$(hwm_mib "$dfdaemon_pid")
rss_ctd_A=$(hwm_mib "$ctd_pid_A")
rss_ctd_B=$(hwm_mib "$ctd_pid_B")
cpu_dfdaemon=$(cpu_s "$dfdaemon_pid")
cpu_ctd_A=$(cpu_s "$ctd_pid_A")
cpu_ctd_B=$(cpu_s "$ctd_pid_B")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ----------------------------------------------------------------- report ---

report=$(python3 - "$tmp" "$pull_bytes" "$read_bytes" "$split" \
    "$rss_dfdaemon" "$cpu_dfdaemon" "$rss_ctd_A" "$cpu_ctd_A" "$rss_ctd_B" "$cpu_ctd_B" <<'EOF'
import statistics, sys
tmp, pull_bytes, read_bytes, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
rss_df, cpu_df, rss_a, cpu_a, rss_b, cpu_b = sys.argv[5:11]
MiB = 1 << 20

def load(name, kind):
    return [float(x) for x in open(f"{tmp}/results-{name}-{kind}").read().split()]

rows = []
steps = [("pull", "pull (fetch + unpack)", pull_bytes), ("read", "read layers back", read_bytes)]
if split:
    steps += [("fetch", "fetch only", pull_bytes), ("unpack", "unpack only", read_bytes)]
for kind, label, nbytes in steps:
    med = {}
    for name, store in (("A", "containerd built-in"), ("B", "dfdaemon proxy")):
        t = load(name, kind)
        med[name] = statistics.median(t)
        rows.append(f"| {label} | {store} | {med[name]:.2f} | {min(t):.2f} | "
                    f"{nbytes / MiB / med[name]:.0f} | {' '.join(f'{x:.2f}' for x in t)} |")
    rows.append(f"| {label} | **ratio B/A** (median) | **{med['B'] / med['A']:.3f}** | | | |")
print("| step | store | median s | min s | MiB/s (median) | all runs s |")
print("|---|---|---|---|---|---|")
print("\n".join(rows))
print()
print("| process | peak RSS (VmHWM) MiB | CPU s, whole run |")
print("|---|---|---|")
print(f"| dfdaemon (B) | {rss_df} | {cpu_df} |")
print(f"| containerd A (built-in store) | {rss_a} | {cpu_a} |")
print(f"| containerd B (dfdaemon proxy) | {rss_b} | {cpu_b} |")
EOF
)

mem=$(free -g | awk '/^Mem:/ { print $2 " GiB total, " $7 " GiB available" }')
cat <<EOF

## content store: containerd built-in (A) vs. dfdaemon (B)

- command: \`$cmdline\`
- date: $(date -u +%Y-%m-%dT%H:%MZ); dfdaemon $dfdaemon_id; $(containerd --version | awk '{print $1 " " $3}')
- machine: $(nproc) CPUs, $mem, kernel $(uname -r); load average before $load_before, after $load_after
- image: \`$image\` (set \`$set_name\`): ${#all_digests[@]} blobs pulled, $(awk -v b="$pull_bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB; ${#layer_digests[@]} layers read back, $(awk -v b="$read_bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB
- $rounds round(s), A and B alternating (odd rounds A first, even rounds B first); each pull cold (image removed with \`ctr image rm --sync\`, no content or snapshot left) after \`sync; echo 3 > /proc/sys/vm/drop_caches\`; registry on loopback (plain HTTP); reads are \`ctr content get\` of every layer right after the pull (page cache hot)$( ((split)) && echo "; fetch only = \`ctr content fetch\` (cold), unpack only = \`ctr image pull\` with the content present, after another drop")

$report
EOF
