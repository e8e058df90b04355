//! Bad layers through the whole fast path: images built here by hand
//! (tests/common/oci.rs), pushed to a real registry and pulled by CRI
//! through containerd and dfdaemon. For each, nothing is written outside
//! the snapshot (a canary directory outside is left as it was), the fast
//! path commits no snapshot for a layer it cannot take and says why, and
//! the pull ends as containerd alone ends it: each image is also pulled
//! into containerd's own overlayfs snapshotter, and both pulls must succeed
//! with the same tree, or both fail. A good image pulled afterwards in the
//! same containerd is not affected.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::oci::{self, Image, Layer, Tar};
use common::snapshotter_node::{CRI_NAMESPACE, SNAPSHOTTER, SnapshotterNode, is_committed};
use common::tree;
use common::{Registry, Scratch, sha256_bytes};

/// containerd's own snapshotter, and the namespace its reference pulls go to.
const REFERENCE_SNAPSHOTTER: &str = "overlayfs";
const REFERENCE_NAMESPACE: &str = "reference";
/// Enough `..` to climb from any snapshot or staging dir to `/`.
const UP: &str = "../../../../../../../../..";
const SECRET: &[u8] = b"the canary's secret\n";

/// What the fast path does with a case's bad layer.
enum FastPath {
    /// Unpacks and commits it.
    Takes,
    /// Leaves it to containerd, counting `reason` and logging `says`.
    Declines {
        reason: &'static str,
        says: &'static str,
    },
}

struct Case {
    name: &'static str,
    /// The layer between a good base layer and a good layer above.
    layer: Layer,
    /// Whether containerd's own applier (containerd 1.6, archive/tar.go and
    /// the unpacker's diff_id check) applies it, and then the file it
    /// writes (relative to the snapshot's root).
    containerd_applies: bool,
    lands_at: Option<String>,
    fast_path: FastPath,
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_layers_escape_nothing_and_end_as_containerd_ends_them() {
    common::require_root!();
    let scratch = Scratch::new();
    let canary = scratch.join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("secret"), SECRET).unwrap();
    let registry = Registry::start(&scratch);
    let node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let base = Layer::gzip(
        Tar::new()
            .dir("damselfly")
            .file("damselfly/base.txt", b"the good base layer\n")
            .finish(),
    );

    // A layer above the bad one: where the bad one goes containerd's way,
    // so must every layer above it.
    let above = Layer::gzip(Tar::new().file("damselfly/above.txt", b"above\n").finish());
    for case in cases(canary.to_str().unwrap()) {
        let image = Image::new(vec![base.clone(), case.layer.clone(), above.clone()]);
        pull_case(&node, &scratch, &registry, &case, &image).await;
        assert_canary_untouched(&canary, case.name);
    }

    let good = Image::new(vec![
        base,
        Layer::gzip(
            Tar::new()
                .file("damselfly/good.txt", b"unaffected\n")
                .finish(),
        ),
    ]);
    let reference = good.push(&registry.host, "good/after", "v1").await;
    node.containerd
        .try_cri_pull(&reference, None)
        .await
        .expect("a good pull afterwards");
    let chain = &good.chain_ids()[1];
    let backend = node.backend_snapshots().await;
    let fast_path_name = format!("{CRI_NAMESPACE}/damselfly/{chain}");
    assert!(
        backend.iter().any(|i| i.name == fast_path_name),
        "{backend:?}"
    );
    let tree = node.snapshot_tree(&scratch, CRI_NAMESPACE, SNAPSHOTTER, chain);
    assert!(
        tree::find(&tree, "/damselfly/good.txt")
            .is_some_and(|e| e.kind == 'f' && e.sha256 == Some(sha256_bytes(b"unaffected\n"))),
        "{tree:?}"
    );
    assert_eq!(
        node.staging_dirs(),
        Vec::<String>::new(),
        "staging dirs left"
    );
}

/// Pulls `image` (base, the case's bad layer, a layer above) by CRI and
/// by containerd alone, and checks the case's outcome.
async fn pull_case(
    node: &SnapshotterNode,
    scratch: &Scratch,
    registry: &Registry,
    case: &Case,
    image: &Image,
) {
    let name = case.name;
    let reference = image
        .push(&registry.host, &format!("bad/{name}"), "v1")
        .await;
    let chains = image.chain_ids();
    let (bad, top) = (&chains[1], &chains[2]);
    let declined_before = match case.fast_path {
        FastPath::Declines { reason, .. } => node.declined(reason).await,
        FastPath::Takes => 0.0,
    };

    let pulled = node.containerd.try_cri_pull(&reference, None).await;
    let alone = node.containerd.ctr_in(
        REFERENCE_NAMESPACE,
        &[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            REFERENCE_SNAPSHOTTER,
            &reference,
        ],
    );
    assert_eq!(
        alone.status.success(),
        case.containerd_applies,
        "{name}: containerd alone: {}",
        String::from_utf8_lossy(&alone.stderr)
    );
    assert_eq!(
        pulled.is_ok(),
        case.containerd_applies,
        "{name}: the CRI pull ends as containerd alone: {pulled:?}\ndfdaemon log:\n{}",
        node.dfdaemon.log_text()
    );

    let backend = node.backend_snapshots().await;
    let on_fast_path = |chain: &str| {
        let wanted = format!("{CRI_NAMESPACE}/damselfly/{chain}");
        backend.iter().any(|info| info.name == wanted)
    };
    assert!(on_fast_path(&chains[0]), "{name}: base on the fast path");
    match case.fast_path {
        FastPath::Takes => {
            assert!(
                on_fast_path(bad) && on_fast_path(top),
                "{name}: {backend:?}"
            );
        }
        FastPath::Declines { reason, says } => {
            assert!(
                !on_fast_path(bad) && !on_fast_path(top),
                "{name}: {backend:?}"
            );
            assert!(
                node.declined(reason).await > declined_before,
                "{name}: a Prepare declined for {reason}"
            );
            let log = node.dfdaemon.log_text();
            let digest = image.digest();
            assert!(
                log.lines().any(|l| l.contains("fast path not taken")
                    && l.contains(&digest)
                    && l.contains(says)),
                "{name}: dfdaemon says why ({says}):\n{log}"
            );
        }
    }
    if case.containerd_applies {
        let ours = node.snapshot_tree(scratch, CRI_NAMESPACE, SNAPSHOTTER, top);
        let theirs = node.snapshot_tree(scratch, REFERENCE_NAMESPACE, REFERENCE_SNAPSHOTTER, top);
        if let Some(diff) = tree::diff(&theirs, &ours, 20) {
            panic!("{name}: the tree containerd alone makes (- containerd, + dfdaemon):\n{diff}");
        }
        for path in [case.lands_at.as_deref().unwrap(), "damselfly/above.txt"] {
            assert!(
                tree::find(&ours, &format!("/{path}")).is_some_and(|e| e.kind == 'f'),
                "{name}: {path} in {ours:?}"
            );
        }
    } else {
        // containerd removes its failed extraction snapshot from its
        // metadata at once, and from dfdaemon at its next GC: until then
        // it may be listed there, active, never committed.
        let committed: Vec<_> = backend
            .iter()
            .filter(|i| is_committed(i) && (i.name.contains(bad) || i.name.contains(top)))
            .collect();
        assert!(
            committed.is_empty(),
            "{name}: nothing committed: {committed:?}"
        );
        let listed = node.k8s(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
        assert!(
            !listed.contains(bad) && !listed.contains(top),
            "{name}: containerd lists none:\n{listed}"
        );
    }
}

/// The bad layers; `canary` is the absolute path of a directory outside
/// every snapshot that they aim at.
fn cases(canary: &str) -> Vec<Case> {
    let inside = canary.trim_start_matches('/');
    let declines = |says| FastPath::Declines {
        reason: "unpack",
        says,
    };
    vec![
        // containerd cleans the name and resolves `..` within the root
        // (fs.RootPath): the file lands at <root><canary>/dotdot.
        Case {
            name: "dotdot",
            layer: Layer::gzip(
                Tar::new()
                    .file(&format!("{UP}{canary}/dotdot"), b"up\n")
                    .finish(),
            ),
            containerd_applies: true,
            lands_at: Some(format!("{inside}/dotdot")),
            fast_path: declines("would escape the root"),
        },
        // Absolute names are taken relative to the root, by both.
        Case {
            name: "absolute",
            layer: Layer::gzip(
                Tar::new()
                    .file(&format!("{canary}/absolute"), b"abs\n")
                    .finish(),
            ),
            containerd_applies: true,
            lands_at: Some(format!("{inside}/absolute")),
            fast_path: FastPath::Takes,
        },
        // containerd resolves the entry's parent symlink within the root:
        // the file lands at <root><canary>/through-symlink.
        Case {
            name: "symlink",
            layer: Layer::gzip(
                Tar::new()
                    .symlink("evil", canary)
                    .file("evil/through-symlink", b"through\n")
                    .finish(),
            ),
            containerd_applies: true,
            lands_at: Some(format!("{inside}/through-symlink")),
            // dfdaemon's applier resolves it the same way.
            fast_path: FastPath::Takes,
        },
        // containerd clamps the link target to <root><canary>/secret
        // (hardlinkRootPath), which the layers lack: link fails, pull fails.
        Case {
            name: "hardlink-up",
            layer: Layer::gzip(
                Tar::new()
                    .hardlink("stolen", &format!("{UP}{canary}/secret"))
                    .finish(),
            ),
            containerd_applies: false,
            lands_at: None,
            fast_path: declines("would escape the root"),
        },
        // The same, with an absolute target.
        Case {
            name: "hardlink-absolute",
            layer: Layer::gzip(
                Tar::new()
                    .hardlink("stolen", &format!("{canary}/secret"))
                    .finish(),
            ),
            containerd_applies: false,
            lands_at: None,
            fast_path: declines("No such file"),
        },
        // A link target under a symlink to the canary: containerd resolves
        // it within the root (no <root><canary>/secret): link fails. Linking
        // by the path on the host would follow the symlink out.
        Case {
            name: "hardlink-via-symlink",
            layer: Layer::gzip(
                Tar::new()
                    .symlink("evil", canary)
                    .hardlink("stolen", "evil/secret")
                    .finish(),
            ),
            containerd_applies: false,
            lands_at: None,
            // The symlink resolves within the root, as in containerd, where
            // the target is missing.
            fast_path: declines("No such file"),
        },
        // containerd's unpacker: "wrong diff id calculated on extraction".
        Case {
            name: "diff-id",
            layer: Layer {
                diff_id: sha256_bytes(b"not this layer"),
                ..Layer::gzip(Tar::new().file("damselfly/lies.txt", b"lies\n").finish())
            },
            containerd_applies: false,
            lands_at: None,
            fast_path: FastPath::Declines {
                reason: "diff_id",
                says: "the config says",
            },
        },
        // The stream ends inside a file's data: gzip's unexpected EOF.
        Case {
            name: "truncated-gzip",
            layer: {
                let mut layer = Layer::gzip(
                    Tar::new()
                        .file("damselfly/cut.bin", &noise(256 << 10))
                        .finish(),
                );
                layer.blob.truncate(layer.blob.len() / 2);
                layer
            },
            containerd_applies: false,
            lands_at: None,
            fast_path: declines("bad Gzip stream"),
        },
        // createTarFile's default: "unhandled tar header type 55".
        Case {
            name: "contiguous",
            layer: Layer::gzip(
                Tar::new()
                    .entry(oci::CONTIGUOUS, "damselfly/contiguous", "", 0o644, b"data")
                    .finish(),
            ),
            containerd_applies: false,
            lands_at: None,
            fast_path: declines("unsupported type"),
        },
        // The same for a type flag no standard defines.
        Case {
            name: "unknown-type",
            layer: Layer::gzip(
                Tar::new()
                    .entry(b'Z', "damselfly/unknown", "", 0o644, b"data")
                    .finish(),
            ),
            containerd_applies: false,
            lands_at: None,
            fast_path: declines("unsupported type"),
        },
        // A PAX global header is ignored by both (createTarFile returns early).
        Case {
            name: "global-header",
            layer: Layer::gzip(
                Tar::new()
                    .entry(
                        oci::GLOBAL_HEADER,
                        "pax_global_header",
                        "",
                        0o644,
                        b"17 comment=hello\n",
                    )
                    .file("damselfly/after-global.txt", b"after\n")
                    .finish(),
            ),
            containerd_applies: true,
            lands_at: Some("damselfly/after-global.txt".into()),
            fast_path: FastPath::Takes,
        },
    ]
}

/// The canary still holds exactly its secret, linked once.
fn assert_canary_untouched(canary: &Path, case: &str) {
    let names: Vec<_> = fs::read_dir(canary)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["secret"], "{case}: nothing written into the canary");
    let secret = canary.join("secret");
    assert_eq!(
        fs::read(&secret).unwrap(),
        SECRET,
        "{case}: secret unchanged"
    );
    assert_eq!(
        fs::metadata(&secret).unwrap().nlink(),
        1,
        "{case}: secret not linked"
    );
}

/// `len` bytes that gzip cannot shrink (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
