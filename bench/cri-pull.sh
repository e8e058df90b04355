#!/usr/bin/env bash
# Benchmark: a cold kubelet-style CRI pull on one node, containerd's own
# store and overlayfs (A) vs. dfdaemon as content store and snapshotter,
# unpacking on its fast path (B).
#
#   sudo bench/cri-pull.sh [--rounds N] [--images LIST] [--dfdaemon PATH]
#                          [--dfget PATH] [--keep-logs DIR]
#
#   --rounds N       measured rounds per image and node (default: 3)
#   --images LIST    comma-separated SET:IMAGE pairs (default:
#                    compressible:damselfly/compressible:v1,bench:damselfly/bench:v1)
#   --dfdaemon PATH  dfdaemon binary (default: target/release/dfdaemon)
#   --dfget PATH     dfget binary (default: target/release/dfget)
#   --keep-logs DIR  copy the logs of every process to DIR before cleaning up
#
# One run starts a private registry on a free loopback port, pushes the sets,
# and starts two containerd instances side by side: A with the built-in
# content store and overlayfs as CRI's snapshotter, B with dfdaemon as its
# content store and as CRI's snapshotter (`damselfly`). Each round, for each
# image, for A and for B (alternating which goes first), it removes every
# image (`ctr image rm --sync`, checking that no content or snapshot of it is
# left), drops the page cache, and times `dfget pull IMAGE` (CRI PullImage:
# containerd's unpacker, which on B asks dfdaemon's fast path). B's pulls
# must be unpacked by dfdaemon: the run fails if a layer went containerd's way.
# Then, per layer, the physical reference: `tar -x` (or `zcat | tar -x`) of the
# same blob into a fresh directory on the same disk, after a drop.
# At the end it prints medians, ratios B/A, per-layer unpack rates (dfdaemon's
# from its log) and the peak RSS of dfdaemon and both containerds as Markdown.
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

rounds=3
images=compressible:damselfly/compressible:v1,bench:damselfly/bench:v1
dfdaemon=$repo/target/release/dfdaemon
dfget=$repo/target/release/dfget
keep_logs=
ns=k8s.io # CRI's namespace

usage() {
    sed -n '6,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --images) images=${2:?}; shift 2 ;;
    --dfdaemon) dfdaemon=${2:?}; shift 2 ;;
    --dfget) dfget=${2:?}; shift 2 ;;
    --keep-logs) keep_logs=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
[[ $images =~ ^[a-z0-9]+:[a-z0-9/._-]+:[a-z0-9._-]+(,[a-z0-9]+:[a-z0-9/._-]+:[a-z0-9._-]+)*$ ]] ||
    { echo "--images must be SET:IMAGE[,SET:IMAGE...], e.g. bench:damselfly/bench:v1" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "run as root (sudo $0)" >&2; exit 1; }
for tool in containerd ctr docker-registry skopeo python3 curl tar zcat; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
for bin in "$dfdaemon" "$dfget"; do
    [[ -x $bin ]] || { echo "no $bin (cargo build --release)" >&2; exit 1; }
done

# ---------------------------------------------------------------- cleanup ---

tmp=
pids=() # everything we started, stopped in reverse order

trap cleanup_run EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------------ setup ---

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
dfdaemon_id="$(bin_id "$dfdaemon"); $(tree_id "$repo")"
tmp=$(mktemp -d /tmp/dfcri.XXXXXX)
chmod 755 "$tmp"
mkdir -p "$tmp/a" "$tmp/b" "$tmp/df" "$tmp/ref"
log "work dir $tmp"

start_registry "$tmp/reg" "$tmp/registry.log"

# Per image (index i): its ref, catalog, OCI layout dir and blob lines
# (KIND DIGEST SIZE MEDIATYPE, from image_blobs).
IFS=, read -ra pairs <<<"$images"
refs=() layouts=() blob_files=()
for ((i = 0; i < ${#pairs[@]}; i++)); do
    set_name=${pairs[i]%%:*} image=${pairs[i]#*:}
    catalog=$(push_set "$set_name" "$tmp/push-$set_name.log")
    image_blobs "$catalog" "$image" >"$tmp/blobs-$i" || die "no $image in set $set_name"
    layout=$(python3 -c 'import json, sys; print(next(i["layout"] for i in json.load(open(sys.argv[1])) if i["ref"] == sys.argv[2]))' "$catalog" "$image")
    refs+=("$registry/$image")
    layouts+=("$(dirname "$catalog")/$layout")
    blob_files+=("$tmp/blobs-$i")
    log "$image: $(wc -l <"$tmp/blobs-$i") blobs, $(grep -c '^layer ' "$tmp/blobs-$i") layers"
done

# CRI reads registry hosts from DIR/certs.d (plain HTTP to our registry); its
# CNI directories are kept under DIR too.
cri_config() {
    local dir=$1 snapshotter=$2
    mkdir -p "$dir/certs.d/$registry"
    printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
        "$registry" "$registry" >"$dir/certs.d/$registry/hosts.toml"
    cat <<TOML
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/certs.d"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "$snapshotter"
TOML
}

start_containerd() {
    local name=$1 dir=$2
    containerd --config "$dir/config.toml" >"$tmp/containerd-$name.log" 2>&1 &
    pids+=($!)
    eval "ctd_pid_$name=$!"
    wait_for "containerd $name" $! ctr -a "$dir/c.sock" version
    log "containerd $name up (pid $!)"
}

# A: built-in store, overlayfs.
write_containerd_config "$tmp/a" "" "$(cri_config "$tmp/a" overlayfs)"
start_containerd A "$tmp/a"

# B: dfdaemon as content store and snapshotter; its fast path reads the same
# hosts directory as B's CRI and records blobs through B's socket.
content_sock=$tmp/df/content.sock
snapshot_sock=$tmp/df/snapshot.sock
metrics=127.0.0.1:$(free_port)
RUST_LOG=info "$dfdaemon" --data-dir "$tmp/df/data" --content-socket "$content_sock" \
    --snapshot-socket "$snapshot_sock" --containerd-socket "$tmp/b/c.sock" \
    --hosts-dir "$tmp/b/certs.d" --metrics-listen "$metrics" >"$tmp/dfdaemon.log" 2>&1 &
dfdaemon_pid=$!
pids+=($dfdaemon_pid)
wait_for dfdaemon $dfdaemon_pid test -S "$snapshot_sock"
log "dfdaemon up (pid $dfdaemon_pid)"
write_containerd_config "$tmp/b" "disabled_plugins = [\"io.containerd.content.v1.content\"]

[proxy_plugins]
  [proxy_plugins.damselfly-content]
    type = \"content\"
    address = \"$content_sock\"
  [proxy_plugins.damselfly]
    type = \"snapshot\"
    address = \"$snapshot_sock\"" "$(cri_config "$tmp/b" damselfly)"
start_containerd B "$tmp/b"

sock_A=$tmp/a/c.sock
sock_B=$tmp/b/c.sock
snapshotter_A=overlayfs
snapshotter_B=damselfly

# -------------------------------------------------------------- measuring ---

# make_cold NAME: removes every lease (dfdaemon holds a recorded layer for a
# minute) and every image (CRI keeps a tag, a digest and an ID ref per image)
# from NAME's containerd, and checks that no content or snapshot is left, and
# for B that dfdaemon's store holds no blob.
make_cold() {
    local name=$1 sock_var=sock_$1 snap_var=snapshotter_$1 listed content snaps
    listed=$(ctr -a "${!sock_var}" -n $ns leases ls -q)
    if [[ -n $listed ]]; then
        # shellcheck disable=SC2086 # one argument per lease
        ctr -a "${!sock_var}" -n $ns leases rm $listed >/dev/null
    fi
    listed=$(ctr -a "${!sock_var}" -n $ns image ls -q)
    if [[ -n $listed ]]; then
        # shellcheck disable=SC2086 # one argument per ref
        ctr -a "${!sock_var}" -n $ns image rm --sync $listed >/dev/null
    fi
    content=$(ctr -a "${!sock_var}" -n $ns content ls -q | wc -l)
    snaps=$(ctr -a "${!sock_var}" -n $ns snapshots --snapshotter "${!snap_var}" ls | tail -n +2 | wc -l)
    [[ $content == 0 && $snaps == 0 ]] ||
        die "$name not cold after image rm --sync: $content blobs, $snaps snapshots left"
    if [[ $name == B && -n $(find "$tmp/df/data/blobs" -type f 2>/dev/null) ]]; then
        die "B: blobs still in dfdaemon's store after image rm --sync"
    fi
}

# pull NAME INDEX ROUND: a cold `dfget pull`; appends its time (dfget's
# "pulled ... in S s") to $tmp/results-NAME-INDEX.
pull() {
    local name=$1 index=$2 round=$3 sock_var=sock_$1 out seconds layers unpacked
    make_cold "$name"
    drop_caches
    out=$("$dfget" pull "${refs[index]}" --containerd "${!sock_var}" --metrics "http://$metrics/metrics" 2>&1) ||
        { echo "$out" >&2; die "dfget pull ${refs[index]} on $name failed"; }
    printf '%s\n' "--- round $round $name ${refs[index]}" "$out" >>"$tmp/dfget.log"
    seconds=$(sed -n 's/^pulled .* in \([0-9.]*\) s (image ID .*)$/\1/p' <<<"$out")
    [[ -n $seconds ]] || { echo "$out" >&2; die "no time in dfget's output"; }
    echo "$seconds" >>"$tmp/results-$name-$index"
    if [[ $name == B ]]; then
        layers=$(grep -c '^layer ' "${blob_files[index]}")
        unpacked=$(sed -n 's/^  dfdaemon fetched and unpacked \([0-9]*\) layers.*/\1/p' <<<"$out")
        [[ $unpacked == "$layers" ]] && ! grep -q "containerd's own way" <<<"$out" ||
            { echo "$out" >&2; die "B: dfdaemon unpacked ${unpacked:-no} of $layers layers; not the fast path"; }
    fi
    log "round $round $name ${refs[index]##*/}: $seconds s"
}

# reference INDEX ROUND: per layer, `tar -x` (gzip: `zcat | tar -x`, zstd:
# `zstd -dc | tar -x`) of the blob from the image's OCI layout into a fresh
# dir, after a drop; appends "DIGEST SECONDS" lines to $tmp/reference-INDEX.
reference() {
    local index=$1 round=$2 kind digest size media blob into t0 t1
    while read -r kind digest size media; do
        [[ $kind == layer ]] || continue
        blob=${layouts[index]}/blobs/sha256/${digest#sha256:}
        into=$tmp/ref/$round-$index-${digest:7:12}
        mkdir "$into"
        drop_caches
        t0=$(now)
        case $media in
        *.tar) tar -x -C "$into" -f "$blob" ;;
        *.tar+gzip) zcat "$blob" | tar -x -C "$into" ;;
        *.tar+zstd) zstd -dcq "$blob" | tar -x -C "$into" ;;
        *) die "no reference unpack for $media" ;;
        esac
        t1=$(now)
        echo "$digest $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >>"$tmp/reference-$index"
        rm -rf "$into"
    done <"${blob_files[index]}"
}

log "measuring $rounds round(s); every pull cold, page cache dropped before each"
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then order=(A B); else order=(B A); fi
    for ((i = 0; i < ${#refs[@]}; i++)); do
        for name in "${order[@]}"; do
            pull "$name" "$i" "$r"
        done
        reference "$i" "$r"
    done
done
make_cold A
make_cold B

rss_dfdaemon=$(hwm_mib "$dfdaemon_pid")
rss_ctd_A=$(hwm_mib "$ctd_pid_A")
rss_ctd_B=$(hwm_mib "$ctd_pid_B")
cpu_dfdaemon=$(cpu_s "$dfdaemon_pid")
cpu_ctd_A=$(cpu_s "$ctd_pid_A")
cpu_ctd_B=$(cpu_s "$ctd_pid_B")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ----------------------------------------------------------------- report ---

report=$(python3 - "$tmp" "$tmp/dfdaemon.log" "${#refs[@]}" "${refs[@]}" \
    "$rss_dfdaemon" "$cpu_dfdaemon" "$rss_ctd_A" "$cpu_ctd_A" "$rss_ctd_B" "$cpu_ctd_B" <<'EOF'
import re, statistics, sys
tmp, dflog, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
refs = sys.argv[4:4 + n]
rss_df, cpu_df, rss_a, cpu_a, rss_b, cpu_b = sys.argv[4 + n:]
MB, MiB = 1e6, 1 << 20

def floats(path):
    return [float(x) for x in open(path).read().split()]

# dfdaemon's per-layer log line: digest, tar_bytes, seconds (fetch + unpack).
unpacked = {}
for line in open(dflog):
    if "fast path: layer fetched and unpacked" in line:
        f = dict(re.findall(r'(\w+)="?([^" ]+)"?', line.split("unpacked", 1)[1]))
        unpacked.setdefault(f["digest"], []).append((int(f["tar_bytes"]), float(f["seconds"])))

print("| image | node | median s | all runs s |")
print("|---|---|---|---|")
for i, ref in enumerate(refs):
    med = {}
    for name, node in (("A", "containerd: built-in store + overlayfs"), ("B", "dfdaemon: content store + snapshotter (fast path)")):
        t = floats(f"{tmp}/results-{name}-{i}")
        med[name] = statistics.median(t)
        print(f"| `{ref.split('/', 1)[1]}` | {node} | {med[name]:.2f} | {' '.join(f'{x:.2f}' for x in t)} |")
    print(f"| `{ref.split('/', 1)[1]}` | **ratio B/A** (median) | **{med['B'] / med['A']:.3f}** | |")
print()
print("Per layer (medians over the rounds; MB/s of uncompressed tar). dfdaemon's time is")
print("from the layer's start to its last byte unpacked, fetch included, all layers at once;")
print("the references run alone, one layer at a time, from a local file.")
print()
print("| image | layer | blob MiB | tar MiB | dfdaemon s | dfdaemon MB/s | reference | reference s | reference MB/s |")
print("|---|---|---|---|---|---|---|---|---|")
for i, ref in enumerate(refs):
    ref_times = {}
    for line in open(f"{tmp}/reference-{i}"):
        digest, seconds = line.split()
        ref_times.setdefault(digest, []).append(float(seconds))
    for line in open(f"{tmp}/blobs-{i}"):
        kind, digest, size, media = line.split()
        if kind != "layer":
            continue
        runs = unpacked.get(digest, [])
        tar_bytes = runs[0][0] if runs else 0
        df_s = statistics.median(s for _, s in runs) if runs else float("nan")
        ref_s = statistics.median(ref_times[digest])
        how = {"gzip": "`zcat \\| tar -x`", "zstd": "`zstd -dc \\| tar -x`"}.get(media.rsplit("+", 1)[-1], "`tar -x`")
        print(f"| `{ref.split('/', 1)[1]}` | {digest[7:19]} | {int(size) / MiB:.1f} | {tar_bytes / MiB:.1f} | "
              f"{df_s:.2f} | {tar_bytes / MB / df_s:.0f} | {how} | {ref_s:.2f} | {tar_bytes / MB / ref_s:.0f} |")
print()
print("| process | peak RSS (VmHWM) MiB | CPU s, whole run |")
print("|---|---|---|")
print(f"| dfdaemon (B) | {rss_df} | {cpu_df} |")
print(f"| containerd A (built-in store, overlayfs) | {rss_a} | {cpu_a} |")
print(f"| containerd B (dfdaemon's proxies) | {rss_b} | {cpu_b} |")
EOF
)

mem=$(free -g | awk '/^Mem:/ { print $2 " GiB total, " $7 " GiB available" }')
cat <<EOF

## CRI pull on one node: containerd (A) vs. dfdaemon's fast path (B)

- command: \`$cmdline\`
- date: $(date -u +%Y-%m-%dT%H:%MZ); dfdaemon $dfdaemon_id; $(containerd --version | awk '{print $1 " " $3}')
- machine: $(nproc) CPUs, $mem, kernel $(uname -r); load average before $load_before, after $load_after
- $rounds round(s) per image, A and B alternating (odd rounds A first); each pull is \`dfget pull IMAGE\` (CRI PullImage, the time dfget reports) after every image was removed with \`ctr image rm --sync\` (no content, no snapshot left) and \`sync; echo 3 > /proc/sys/vm/drop_caches\`; registry on loopback (plain HTTP, \`hosts.toml\`); every B pull checked to be unpacked by dfdaemon, all layers

$report
EOF
