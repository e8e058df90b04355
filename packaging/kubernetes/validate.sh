#!/bin/sh
# Renders every kustomization under packaging/kubernetes (the base, each
# overlay, the node uninstaller) with `kubectl kustomize` and validates the
# output with kubernetes-validate (strict: unknown fields are errors)
# against Kubernetes $K8S_VERSION. OpenShift's SecurityContextConstraints
# have no schema there; they are checked for the fields the pods rely on.
# Run by .ci/run.
set -eu
cd "$(dirname "$0")"
K8S_VERSION=${K8S_VERSION:-1.37.0}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for dir in base overlays/kubernetes overlays/openshift node-uninstaller; do
    name=$(echo "$dir" | tr / -)
    kubectl kustomize "$dir" > "$out/$name.yaml"
    kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out/$name.yaml"
    echo "$dir: $(grep -c '^kind:' "$out/$name.yaml") objects rendered and valid"
done
python3 - "$out/overlays-openshift.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
sccs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "SecurityContextConstraints"}
node, supernode = sccs["damselfly-node"], sccs["damselfly-supernode"]
assert node["allowPrivilegedContainer"] and node["allowHostPID"] and node["allowHostDirVolumePlugin"]
assert "system:serviceaccount:damselfly:damselfly-node" in node["users"]
assert not supernode["allowPrivilegedContainer"]
groups = [g for d in docs if d["kind"] == "StatefulSet"
          for g in d["spec"]["template"]["spec"]["securityContext"]["supplementalGroups"]]
ranges = supernode["supplementalGroups"]["ranges"]
assert all(any(r["min"] <= g <= r["max"] for r in ranges) for g in groups), (groups, ranges)
pv = next(d for d in docs if d["kind"] == "PersistentVolume")
assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
print("overlays/openshift: SecurityContextConstraints match the pods")
PY
