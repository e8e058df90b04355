//! `dfdaemon containerd-config install|uninstall` on sample configs
//! (tests/data/containerd-configs/, plus the defaults of the containerd
//! installed here): install, install again (no change), uninstall (the
//! original, byte for byte), an edit made after install kept by uninstall,
//! and unsupported configs refused with the reason and left untouched. The
//! real binary is run, as an installer would.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Scratch;

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/containerd-configs")
}

/// Runs `dfdaemon containerd-config ACTION --config CONFIG ARGS`.
fn config_cmd(action: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dfdaemon"))
        .args(["containerd-config", action, "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run dfdaemon containerd-config")
}

fn ok(out: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "failed: {text}");
    text
}

/// The files next to `config` other than itself.
fn siblings(config: &Path) -> Vec<String> {
    let name = config.file_name().unwrap().to_string_lossy().into_owned();
    let mut found: Vec<String> = fs::read_dir(config.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name) && *n != name)
        .collect();
    found.sort();
    found
}

/// Install, install again, uninstall on a copy of `original`; returns the
/// installed text.
fn round_trip(scratch: &Scratch, name: &str, original: &[u8], cri_table: &str) -> String {
    let config = scratch.join(name);
    fs::write(&config, original).unwrap();

    let dry = ok(config_cmd("install", &config, &["--dry-run"]));
    assert!(dry.contains("+[proxy_plugins.damselfly-content]"), "{dry}");
    assert_eq!(fs::read(&config).unwrap(), original, "a dry run wrote");
    assert!(siblings(&config).is_empty(), "a dry run left files");

    let said = ok(config_cmd("install", &config, &[]));
    assert!(said.contains(": changed"), "{said}");
    let installed = fs::read_to_string(&config).unwrap();
    let doc: toml::Table = toml::from_str(&installed).expect("installed config parses");
    let lookup = |path: &[&str]| -> Option<toml::Value> {
        let mut value = toml::Value::Table(doc.clone());
        for key in path {
            value = value.get(key)?.clone();
        }
        Some(value)
    };
    let str_at = |path: &[&str]| lookup(path).and_then(|v| v.as_str().map(str::to_owned));
    assert_eq!(
        str_at(&["proxy_plugins", "damselfly-content", "type"]).as_deref(),
        Some("content")
    );
    assert_eq!(
        str_at(&["proxy_plugins", "damselfly", "address"]).as_deref(),
        Some("/run/damselfly/snapshot.sock")
    );
    let disabled = lookup(&["disabled_plugins"]).expect("disabled_plugins");
    assert!(
        disabled
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str() == Some("io.containerd.content.v1.content")),
        "{installed}"
    );
    let cri: Vec<&str> = cri_table.split('/').collect();
    let mut snapshotter = cri.clone();
    snapshotter.push("snapshotter");
    assert_eq!(
        str_at(&snapshotter).as_deref(),
        Some("damselfly"),
        "{installed}"
    );
    assert_eq!(
        siblings(&config),
        [
            format!("{name}.damselfly-backup"),
            format!("{name}.damselfly-state.json")
        ]
    );
    assert_eq!(
        fs::read(scratch.join(&format!("{name}.damselfly-backup"))).unwrap(),
        original
    );

    let again = ok(config_cmd("install", &config, &[]));
    assert!(again.contains(": unchanged"), "{again}");
    assert_eq!(fs::read_to_string(&config).unwrap(), installed);

    ok(config_cmd("uninstall", &config, &[]));
    assert_eq!(
        fs::read(&config).unwrap(),
        original,
        "uninstall gives back the original bytes"
    );
    assert!(siblings(&config).is_empty(), "{:?}", siblings(&config));
    installed
}

const V2_CRI: &str = "plugins/io.containerd.grpc.v1.cri/containerd";

#[test]
fn install_reinstall_uninstall_on_every_sample() {
    let scratch = Scratch::new();
    for (name, cri) in [
        ("v2-comments.toml", V2_CRI),
        ("v2-proxy-plugins.toml", V2_CRI),
        ("v2-mirrors-hosts.toml", V2_CRI),
        ("v3.toml", "plugins/io.containerd.cri.v1.images"),
    ] {
        let original = fs::read(samples().join(name)).unwrap();
        let installed = round_trip(&scratch, name, &original, cri);
        // Comments and unrelated settings are still there, as written.
        for line in String::from_utf8(original).unwrap().lines() {
            let kept = line.trim_start().starts_with('#')
                || [
                    "SystemdCgroup",
                    "stargz-grpc.sock",
                    "password",
                    "enable_selinux",
                ]
                .iter()
                .any(|k| line.contains(k));
            if kept {
                assert!(
                    installed.contains(line),
                    "{name}: lost {line:?}:\n{installed}"
                );
            }
        }
        if name == "v2-mirrors-hosts.toml" {
            assert!(
                installed.contains("config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\""),
                "an existing config_path is kept:\n{installed}"
            );
        }
    }

    // The defaults of the containerd on this machine (1.6: version 2).
    let defaults = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(defaults.status.success());
    let installed = round_trip(&scratch, "default.toml", &defaults.stdout, V2_CRI);
    assert!(
        installed.contains("config_path = \"/etc/containerd/certs.d\""),
        "{installed}"
    );
}

#[test]
fn uninstall_after_a_later_edit_undoes_only_damselflys_edits() {
    let scratch = Scratch::new();
    let config = scratch.join("config.toml");
    let original = fs::read_to_string(samples().join("v2-proxy-plugins.toml")).unwrap();
    fs::write(&config, &original).unwrap();
    ok(config_cmd("install", &config, &[]));
    let mut edited = fs::read_to_string(&config).unwrap();
    edited.push_str("\n[metrics]\n  address = \"127.0.0.1:1338\"\n");
    fs::write(&config, &edited).unwrap();

    let said = ok(config_cmd("uninstall", &config, &[]));
    assert!(said.contains("changed since install"), "{said}");
    let back = fs::read_to_string(&config).unwrap();
    let doc: toml::Table = toml::from_str(&back).unwrap();
    let want: toml::Table = toml::from_str(&format!(
        "{original}\n[metrics]\n  address = \"127.0.0.1:1338\"\n"
    ))
    .unwrap();
    assert_eq!(doc, want, "the original plus the later edit:\n{back}");
    assert!(siblings(&config).is_empty());
}

#[test]
fn unsupported_configs_are_refused_and_left_untouched() {
    let scratch = Scratch::new();
    for (name, reason) in [
        ("unsupported-v1.toml", "version 1"),
        ("unsupported-legacy-mirrors.toml", "`mirrors`"),
        ("unsupported-other-content.toml", "already a content store"),
        ("unsupported-damselfly-elsewhere.toml", "already exists"),
    ] {
        let config = scratch.join(name);
        let original = fs::read(samples().join(name)).unwrap();
        fs::write(&config, &original).unwrap();
        let out = config_cmd("install", &config, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was installed");
        assert!(
            stderr.contains("cannot install damselfly") && stderr.contains(reason),
            "{name}: {stderr}"
        );
        assert_eq!(fs::read(&config).unwrap(), original, "{name} was changed");
        assert!(
            siblings(&config).is_empty(),
            "{name}: {:?}",
            siblings(&config)
        );
    }
    let config = scratch.join("never-installed.toml");
    fs::write(&config, "version = 2\n").unwrap();
    let out = config_cmd("uninstall", &config, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to undo"));
    assert_eq!(fs::read(&config).unwrap(), b"version = 2\n");
}
