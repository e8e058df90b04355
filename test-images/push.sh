#!/usr/bin/env bash
# Generate (or reuse) a set of damselfly test images and push it to a registry.
#
#   push.sh [--cert-dir DIR] [--creds USER:PASS] REGISTRY_HOSTPORT SET [WORKDIR]
#                                     push every image of SET to the registry
#   push.sh --describe SET [WORKDIR]  print SET's catalog.json; push nothing
#
# Without --cert-dir the registry is plain HTTP. With it, it is HTTPS,
# verified against the CAs (*.crt) in DIR. --creds logs in with Basic auth.
#
# WORKDIR (default /tmp/damselfly-test-images/SET, for a user other than
# root /tmp/damselfly-test-images-UID/SET) holds the generated OCI
# layouts and catalog.json; a complete generation by the same generate.py is
# reused. Concurrent runs on one WORKDIR wait for each other (flock WORKDIR.lock).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    sed -n '4,9p' "$0" >&2
    exit 2
}

# Generate SET into DIR unless DIR already holds a complete generation of SET
# by this very generate.py (its sha256 and the set name are in DIR/.stamp).
ensure_generated() {
    local set=$1 dir=$2 stamp
    stamp="$(sha256sum "$here/generate.py" | cut -d' ' -f1) $set"
    if [[ -f $dir/catalog.json && "$(cat "$dir/.stamp" 2>/dev/null)" == "$stamp" ]]; then
        return
    fi
    if [[ -e $dir ]]; then
        if [[ ! -f $dir/.stamp && -n "$(ls -A "$dir")" ]]; then
            echo "refusing to replace $dir: not empty and not made by push.sh" >&2
            exit 1
        fi
        rm -rf "$dir"
    fi
    rm -rf "$dir.partial"
    python3 "$here/generate.py" --set "$set" --out "$dir.partial" >&2
    echo "$stamp" >"$dir.partial/.stamp"
    mv "$dir.partial" "$dir"
}

# Push every image listed in DIR/catalog.json, keeping every digest; the
# arguments after DIR are skopeo's destination options (TLS and login).
push_all() {
    local registry=$1 dir=$2 layout oci_ref ref
    shift 2
    python3 -c '
import json, sys
for image in json.load(open(sys.argv[1])):
    print(image["layout"], image["oci_ref"], image["ref"])
' "$dir/catalog.json" | while read -r layout oci_ref ref; do
        skopeo copy --quiet --all --preserve-digests "$@" \
            "oci:$dir/$layout:$oci_ref" "docker://$registry/$ref"
        echo "pushed $registry/$ref"
    done
}

main() {
    local cert_dir="" creds=""
    while [[ $# -ge 2 && $1 == --* && $1 != --describe ]]; do
        case $1 in
        --cert-dir) cert_dir=$2 ;;
        --creds) creds=$2 ;;
        *) usage ;;
        esac
        shift 2
    done
    local dest_opts=(--dest-tls-verify=false)
    [[ -z $cert_dir ]] || dest_opts=(--dest-cert-dir "$cert_dir")
    [[ -z $creds ]] || dest_opts+=(--dest-creds "$creds")
    [[ $# -ge 2 && $# -le 3 ]] || usage
    local registry=$1 # or --describe
    shift
    local set=$1
    local cache=/tmp/damselfly-test-images
    [ "$(id -u)" = 0 ] || cache+="-$(id -u)" # root's cache is not writable by others
    local dir=${2:-$cache/$set}
    dir=${dir%/}

    mkdir -p "$(dirname "$dir")"
    exec 9>"$dir.lock"
    flock 9
    ensure_generated "$set" "$dir"
    if [[ $registry == --describe ]]; then
        cat "$dir/catalog.json"
    else
        push_all "$registry" "$dir" "${dest_opts[@]}"
        echo "catalog: $dir/catalog.json"
    fi
}

main "$@"
