#!/bin/sh
# damselfly's node installer: the script the node-installer DaemonSet's pod
# runs (packaging/kubernetes/base/node-installer.yaml), also usable by hand.
#
#   damselfly-node.sh install     install or upgrade dfdaemon on the host, switch containerd, then sleep
#   damselfly-node.sh uninstall   switch containerd back, remove what install put on the host, then sleep
#
# It works on the host's file system mounted at $HOST_ROOT and acts on the
# host's systemd and containerd through $SYSTEMCTL and $CTR (nsenter into
# PID 1's mount namespace by default: the pod has hostPID). Tests point
# HOST_ROOT at a scratch dir and substitute the two commands.
#
# Why it is safe (the bootstrap problem): containerd needs its content store
# to create any container. If dfdaemon were this pod, a node reboot or a
# crash of the pod would leave containerd unable to start it again. So this
# pod only *installs* dfdaemon as a systemd unit ordered before containerd
# and then sleeps: systemd runs dfdaemon; nothing on the node depends on this
# pod. An upgrade (a new pod image) replaces the host binary and restarts
# dfdaemon.service; containerd keeps its config and is not restarted.
set -eu

HOST_ROOT=${HOST_ROOT:-/host}
# What the image holds: bin/dfdaemon, systemd/, dfdaemon.yml.
PAYLOAD=${PAYLOAD:-/opt/damselfly}
SYSTEMCTL=${SYSTEMCTL:-nsenter --target 1 --mount -- systemctl}
CTR=${CTR:-nsenter --target 1 --mount -- ctr}
CONTAINERD_DEFAULTS=${CONTAINERD_DEFAULTS:-nsenter --target 1 --mount -- containerd config default}
# dfdaemon's installer subcommands run from the image, on host paths.
DFDAEMON=${DFDAEMON:-$PAYLOAD/bin/dfdaemon}
# The supernode Service's DNS name (resolved here: the host cannot resolve
# cluster names) and this node's IP (the downward API's status.hostIP).
SUPERNODE_SERVICE=${SUPERNODE_SERVICE:-}
NODE_IP=${NODE_IP:-}
# An image pulled through dfdaemon to prove the node works (optional).
PROBE_IMAGE=${PROBE_IMAGE:-}
# Touched when done (the pod's readiness probe).
READY_FILE=${READY_FILE:-}
# Set to 1 to exit when done instead of sleeping (tests, init containers).
ONESHOT=${ONESHOT:-0}
# Set to 1 to make uninstall delete dfdaemon's store too.
PURGE=${PURGE:-0}

CONFIG=/etc/containerd/config.toml
CONTENT=/var/lib/containerd/io.containerd.content.v1.content
DATA=/var/lib/damselfly
BIN=/usr/local/bin/dfdaemon
UNIT=/etc/systemd/system/dfdaemon.service
DROPIN=/etc/systemd/system/containerd.service.d/damselfly.conf
DFCONFIG=/etc/damselfly/dfdaemon.yml

log() { echo "damselfly-node: $*"; }
host() { echo "$HOST_ROOT$1"; }

# Copies $1 to host path $2 with mode $3 if it differs; atomic (rename).
# Succeeds (0) when it changed something.
put() {
    if [ -f "$(host "$2")" ] && cmp -s "$1" "$(host "$2")"; then
        return 1
    fi
    mkdir -p "$(dirname "$(host "$2")")"
    cp "$1" "$(host "$2").damselfly-new"
    chmod "$3" "$(host "$2").damselfly-new"
    mv "$(host "$2").damselfly-new" "$(host "$2")"
    log "installed $2"
}

# The dfdaemon config for this node: the image's, with the supernode and
# this node's address when known.
node_config() {
    cat "$PAYLOAD/dfdaemon.yml"
    if [ -n "$SUPERNODE_SERVICE" ] && [ -n "$NODE_IP" ]; then
        ip=$(getent hosts "$SUPERNODE_SERVICE" | awk '{ print $1; exit }')
        [ -n "$ip" ] || { log "cannot resolve $SUPERNODE_SERVICE"; exit 1; }
        printf 'nodes:\n  - %s\nadvertise_ip: %s\n' "$ip" "$NODE_IP"
    fi
}

switched() { [ -f "$(host "$CONFIG").damselfly-state.json" ]; }

import_content() {
    $DFDAEMON import-content --from "$(host "$CONTENT")" --data-dir "$(host "$DATA")"
}

wait_for_containerd() {
    tries=0
    until $CTR plugins ls 2>/dev/null | grep -Eq '^io\.containerd\.content\.v1 +damselfly-content .* ok'; do
        tries=$((tries + 1))
        [ "$tries" -lt 120 ] || { log "containerd does not use dfdaemon"; exit 1; }
        sleep 1
    done
    if [ -n "$PROBE_IMAGE" ]; then
        $CTR --namespace k8s.io image pull "$PROBE_IMAGE" >/dev/null
        log "pulled $PROBE_IMAGE through dfdaemon"
    fi
    log "containerd's content store is dfdaemon"
}

install() {
    changed=0
    put "$PAYLOAD/bin/dfdaemon" "$BIN" 0755 && changed=1
    # The unit as the Debian package ships it, pointed at this binary.
    unit=$(mktemp)
    sed 's|^ExecStart=/usr/bin/dfdaemon|ExecStart=/usr/local/bin/dfdaemon|' \
        "$PAYLOAD/systemd/dfdaemon.service" > "$unit"
    put "$unit" "$UNIT" 0644 && changed=1
    rm -f "$unit"
    put "$PAYLOAD/systemd/containerd.service.d/damselfly.conf" "$DROPIN" 0644 && changed=1
    config=$(mktemp)
    node_config > "$config"
    put "$config" "$DFCONFIG" 0644 && changed=1
    rm -f "$config"
    mkdir -p "$(host "$DATA")"
    chmod 0700 "$(host "$DATA")"
    $SYSTEMCTL daemon-reload
    if ! switched; then
        # The bulk of the blobs, while containerd still serves from its own
        # store; dfdaemon must not hold its store open meanwhile.
        $SYSTEMCTL stop dfdaemon.service
        import_content
    fi
    $SYSTEMCTL enable dfdaemon.service
    if [ "$changed" = 1 ] || ! $SYSTEMCTL is-active --quiet dfdaemon.service; then
        # An upgrade: containerd keeps running and reconnects.
        $SYSTEMCTL restart dfdaemon.service
    fi
    # Active means its sockets exist (the unit's ExecStartPost).
    $SYSTEMCTL is-active --quiet dfdaemon.service || { log "dfdaemon did not start"; exit 1; }
    if ! switched; then
        [ -f "$(host "$CONFIG")" ] || $CONTAINERD_DEFAULTS > "$(host "$CONFIG")"
        $DFDAEMON containerd-config install --config "$(host "$CONFIG")"
        # Blobs pulled since the first import, with containerd stopped and
        # dfdaemon off its store for the moment; then dfdaemon first.
        $SYSTEMCTL stop containerd.service
        $SYSTEMCTL stop dfdaemon.service
        import_content
        $SYSTEMCTL start dfdaemon.service
        $SYSTEMCTL start containerd.service
    fi
    wait_for_containerd
}

uninstall() {
    if switched; then
        $DFDAEMON containerd-config uninstall --config "$(host "$CONFIG")"
        $SYSTEMCTL stop containerd.service
        # Blobs pulled while on dfdaemon go back into containerd's store.
        if [ -d "$(host "$DATA")/blobs/sha256" ]; then
            mkdir -p "$(host "$CONTENT")/blobs/sha256"
            cp -a -l -n "$(host "$DATA")/blobs/sha256/." "$(host "$CONTENT")/blobs/sha256/"
        fi
        $SYSTEMCTL start containerd.service
    fi
    $SYSTEMCTL disable --now dfdaemon.service || true
    rm -f "$(host "$BIN")" "$(host "$UNIT")" "$(host "$DROPIN")" "$(host "$DFCONFIG")"
    rmdir "$(dirname "$(host "$DROPIN")")" "$(dirname "$(host "$DFCONFIG")")" 2>/dev/null || true
    $SYSTEMCTL daemon-reload
    if [ "$PURGE" = 1 ]; then
        rm -rf "$(host "$DATA")"
    fi
    log "uninstalled"
}

case "${1:-}" in
    install) install ;;
    uninstall) uninstall ;;
    *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
[ -z "$READY_FILE" ] || touch "$READY_FILE"
[ "$ONESHOT" = 1 ] || exec sleep infinity
