//! The node installer DaemonSet's own script
//! (packaging/node-installer/damselfly-node.sh) against a scratch host
//! root: install puts exactly the expected files there (binary, units,
//! config, dfdaemon's store with containerd's blobs hard-linked in, the
//! containerd config edited with its backup), starts dfdaemon before
//! containerd comes back; installing again changes nothing and restarts
//! nothing; an upgrade restarts dfdaemon only; uninstall leaves the host as
//! it was. systemd and ctr are stand-ins that log their calls (the real
//! switch is tests/packaging_switch.rs); dfdaemon's subcommands are real.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Scratch, sha256_bytes};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every file and dir under `root`, relative, dirs with a trailing `/`.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

struct Bed {
    _scratch: Scratch,
    root: PathBuf,
    payload: PathBuf,
    calls: PathBuf,
    fakes: PathBuf,
}

impl Bed {
    fn new() -> Self {
        let scratch = Scratch::new();
        let root = scratch.join("host");
        let payload = scratch.join("payload");
        let fakes = scratch.join("fakes");
        let calls = scratch.join("calls.log");
        for dir in [&root, &payload, &fakes] {
            fs::create_dir_all(dir).unwrap();
        }
        // The image's payload, laid out as packaging/node-installer/Dockerfile does.
        fs::create_dir_all(payload.join("bin")).unwrap();
        fs::create_dir_all(payload.join("systemd/containerd.service.d")).unwrap();
        fs::copy(env!("CARGO_BIN_EXE_dfdaemon"), payload.join("bin/dfdaemon")).unwrap();
        for file in ["dfdaemon.service", "containerd.service.d/damselfly.conf"] {
            fs::copy(
                repo(&format!("packaging/systemd/{file}")),
                payload.join(format!("systemd/{file}")),
            )
            .unwrap();
        }
        fs::copy(
            repo("packaging/defaults/dfdaemon.yml"),
            payload.join("dfdaemon.yml"),
        )
        .unwrap();
        // systemctl: logs; a unit is active between start/restart and stop.
        write_exec(
            &fakes.join("systemctl"),
            &format!(
                "#!/bin/sh\necho \"systemctl $*\" >> {calls}\nstate={fakes}/active-$(echo \"$*\" | awk '{{print $NF}}')\n\
                 case \"$1\" in\n  start|restart) touch \"$state\" ;;\n  stop) rm -f \"$state\" ;;\n  \
                 disable) rm -f \"$state\" ;;\n  is-active) [ -f \"$state\" ] ;;\nesac\n",
                calls = calls.display(),
                fakes = fakes.display()
            ),
        );
        // ctr: says dfdaemon is the content store once the config says so.
        write_exec(
            &fakes.join("ctr"),
            &format!(
                "#!/bin/sh\necho \"ctr $*\" >> {calls}\ngrep -q damselfly-content {root}/etc/containerd/config.toml && \
                 echo 'io.containerd.content.v1     damselfly-content    -    ok'\n",
                calls = calls.display(),
                root = root.display()
            ),
        );
        // The host as it was: containerd's config and one blob in its store.
        fs::create_dir_all(root.join("etc/containerd")).unwrap();
        fs::copy(
            repo("tests/data/containerd-configs/v2-comments.toml"),
            root.join("etc/containerd/config.toml"),
        )
        .unwrap();
        let blobs = root.join("var/lib/containerd/io.containerd.content.v1.content/blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let blob = b"a layer pulled before damselfly";
        fs::write(
            blobs.join(sha256_bytes(blob).trim_start_matches("sha256:")),
            blob,
        )
        .unwrap();
        Self {
            _scratch: scratch,
            root,
            payload,
            calls,
            fakes,
        }
    }

    /// Runs the script with `action`; returns the systemctl/ctr calls it made.
    fn run(&self, action: &str, env: &[(&str, &str)]) -> Vec<String> {
        let _ = fs::remove_file(&self.calls);
        let out = Command::new("sh")
            .arg(repo("packaging/node-installer/damselfly-node.sh"))
            .arg(action)
            .env("HOST_ROOT", &self.root)
            .env("PAYLOAD", &self.payload)
            .env("DFDAEMON", env!("CARGO_BIN_EXE_dfdaemon"))
            .env("SYSTEMCTL", self.fakes.join("systemctl"))
            .env("CTR", self.fakes.join("ctr"))
            .env("CONTAINERD_DEFAULTS", "false")
            .env("ONESHOT", "1")
            .envs(env.iter().copied())
            .output()
            .expect("run damselfly-node.sh");
        assert!(
            out.status.success(),
            "damselfly-node.sh {action} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn position(calls: &[String], call: &str) -> usize {
    calls
        .iter()
        .rposition(|c| c == call)
        .unwrap_or_else(|| panic!("no {call:?} in {calls:#?}"))
}

#[test]
fn install_upgrade_uninstall_on_a_scratch_host_root() {
    let bed = Bed::new();
    let before = tree(&bed.root);
    let config = bed.root.join("etc/containerd/config.toml");
    let original_config = fs::read(&config).unwrap();
    let blob_dir = "var/lib/containerd/io.containerd.content.v1.content/blobs/sha256";
    let blob_name = fs::read_dir(bed.root.join(blob_dir))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();

    let calls = bed.run("install", &[]);
    let added: BTreeSet<String> = tree(&bed.root).difference(&before).cloned().collect();
    let expected: BTreeSet<String> = [
        "usr/",
        "usr/local/",
        "usr/local/bin/",
        "usr/local/bin/dfdaemon",
        "etc/systemd/",
        "etc/systemd/system/",
        "etc/systemd/system/dfdaemon.service",
        "etc/systemd/system/containerd.service.d/",
        "etc/systemd/system/containerd.service.d/damselfly.conf",
        "etc/damselfly/",
        "etc/damselfly/dfdaemon.yml",
        "etc/containerd/config.toml.damselfly-backup",
        "etc/containerd/config.toml.damselfly-state.json",
        "var/lib/damselfly/",
        "var/lib/damselfly/blobs/",
        "var/lib/damselfly/blobs/sha256/",
        "var/lib/damselfly/ingest/",
        "var/lib/damselfly/metadata.redb",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("var/lib/damselfly/blobs/sha256/{blob_name}")])
    .collect();
    assert_eq!(added, expected);
    assert!(tree(&bed.root).is_superset(&before));
    assert_eq!(
        fs::read(bed.root.join("usr/local/bin/dfdaemon")).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_dfdaemon")).unwrap()
    );
    assert_eq!(
        fs::read_to_string(bed.root.join("etc/systemd/system/dfdaemon.service")).unwrap(),
        fs::read_to_string(repo("packaging/systemd/dfdaemon.service"))
            .unwrap()
            .replace(
                "ExecStart=/usr/bin/dfdaemon",
                "ExecStart=/usr/local/bin/dfdaemon"
            ),
        "the package's unit, on the installed binary"
    );
    let ino = |p: &str| fs::metadata(bed.root.join(p)).unwrap().ino();
    assert_eq!(
        ino(&format!("{blob_dir}/{blob_name}")),
        ino(&format!("var/lib/damselfly/blobs/sha256/{blob_name}")),
        "the blob is hard-linked, not copied"
    );
    let data_mode = fs::metadata(bed.root.join("var/lib/damselfly"))
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(data_mode, 0o700);
    let installed = fs::read_to_string(&config).unwrap();
    assert!(
        installed.contains("[proxy_plugins.damselfly-content]"),
        "{installed}"
    );
    // dfdaemon runs before containerd starts on the new config.
    let dfdaemon_up = position(&calls, "systemctl start dfdaemon.service");
    let containerd_down = position(&calls, "systemctl stop containerd.service");
    let containerd_up = position(&calls, "systemctl start containerd.service");
    assert!(
        containerd_down < dfdaemon_up && dfdaemon_up < containerd_up,
        "{calls:#?}"
    );
    assert!(calls.contains(&"systemctl enable dfdaemon.service".to_owned()));
    assert!(
        calls.iter().any(|c| c.starts_with("ctr plugins ls")),
        "{calls:#?}"
    );

    // Again: nothing changes, nothing restarts.
    let files = tree(&bed.root);
    let calls = bed.run("install", &[]);
    assert_eq!(tree(&bed.root), files);
    assert_eq!(fs::read_to_string(&config).unwrap(), installed);
    assert!(
        calls
            .iter()
            .all(|c| !c.contains("restart") && !c.contains("containerd.service")),
        "{calls:#?}"
    );

    // An upgrade: a new binary; dfdaemon restarts, containerd does not.
    fs::write(
        bed.payload.join("bin/dfdaemon"),
        b"#!/bin/sh\n# dfdaemon v2\n",
    )
    .unwrap();
    let calls = bed.run("install", &[]);
    assert_eq!(
        fs::read(bed.root.join("usr/local/bin/dfdaemon")).unwrap(),
        b"#!/bin/sh\n# dfdaemon v2\n"
    );
    assert!(calls.contains(&"systemctl restart dfdaemon.service".to_owned()));
    assert!(
        calls.iter().all(|c| !c.contains("containerd.service")),
        "{calls:#?}"
    );
    assert_eq!(tree(&bed.root), files);

    // Uninstall: containerd's config back byte for byte, the host's files
    // as they were, dfdaemon's store kept (PURGE=1 removes it).
    let calls = bed.run("uninstall", &[]);
    assert_eq!(fs::read(&config).unwrap(), original_config);
    // Empty dirs install created (usr/local/bin, etc/systemd/system) stay:
    // they belong to the host's layout.
    let dirs: BTreeSet<String> = [
        "usr/",
        "usr/local/",
        "usr/local/bin/",
        "etc/systemd/",
        "etc/systemd/system/",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let after: BTreeSet<String> = tree(&bed.root).difference(&before).cloned().collect();
    assert!(
        after
            .iter()
            .all(|p| dirs.contains(p) || p.starts_with("var/lib/damselfly/")),
        "{after:#?}"
    );
    assert!(calls.contains(&"systemctl disable --now dfdaemon.service".to_owned()));
    assert!(calls.contains(&"systemctl start containerd.service".to_owned()));
    bed.run("uninstall", &[("PURGE", "1")]);
    let left: BTreeSet<String> = tree(&bed.root).difference(&before).cloned().collect();
    assert_eq!(left, dirs);
}
