//! The Debian package: `cargo deb` builds it from the release binaries,
//! `lintian` finds no error, its contents, conffiles and maintainer scripts
//! are what README.md says, and `dpkg --root` installs it into a throwaway
//! root (busybox as its shell, so the maintainer scripts really run there,
//! chrooted), where postinst makes dfdaemon's store dir 0700, prerm refuses
//! removal while containerd still uses dfdaemon, and purge leaves nothing.
//! Needs `cargo-deb`, `lintian`, `dpkg` and busybox-static (.ci/run
//! installs them).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Scratch;

fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package into `dir`; its path.
fn build_deb(dir: &Path) -> PathBuf {
    let deb = dir.join("damselfly.deb");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["deb", "--no-build", "--strip", "--output"])
        .arg(&deb));
    deb
}

/// A root dpkg can install into and run maintainer scripts in: busybox
/// for /bin/sh and the tools, root's passwd entry, /dev/null, dpkg's db.
fn throwaway_root(root: &Path) {
    for dir in [
        "bin",
        "sbin",
        "dev",
        "etc",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        fs::write(root.join(file), "").unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let applets = text(&run(Command::new("/bin/busybox").arg("--list")));
    for applet in applets.lines().filter(|a| *a != "busybox") {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    // dpkg wants these on PATH; nothing here needs them to do anything.
    for tool in ["ldconfig", "start-stop-daemon"] {
        let path = root.join("sbin").join(tool);
        if !path.exists() {
            symlink("/bin/true", &path).unwrap();
        }
    }
    run(Command::new("mknod")
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]));
}

fn dpkg(root: &Path, args: &[&str]) -> Output {
    Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends"])
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .expect("run dpkg")
}

#[test]
fn the_deb_builds_passes_lintian_and_installs_into_a_throwaway_root() {
    let scratch = Scratch::new();
    let deb = build_deb(scratch.path());

    let lintian = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb)
        .output()
        .expect("run lintian");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&lintian.stdout),
        String::from_utf8_lossy(&lintian.stderr)
    );
    assert!(lintian.status.success(), "lintian:\n{report}");
    assert!(!report.lines().any(|l| l.starts_with("E:")), "{report}");

    // Contents: path -> mode.
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let contents: BTreeMap<String, String> = listing
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (
                fields[5].trim_start_matches('.').to_owned(),
                fields[0].to_owned(),
            )
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/dfdaemon", "-rwxr-xr-x"),
        ("/usr/bin/supernode", "-rwxr-xr-x"),
        ("/usr/bin/dfget", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/dfdaemon.service", "-rw-r--r--"),
        ("/usr/lib/systemd/system/supernode.service", "-rw-r--r--"),
        (
            "/usr/lib/systemd/system/containerd.service.d/damselfly.conf",
            "-rw-r--r--",
        ),
        ("/etc/damselfly/dfdaemon.yml", "-rw-r--r--"),
        ("/etc/damselfly/supernode.env", "-rw-r--r--"),
        ("/usr/share/doc/damselfly/copyright", "-rw-r--r--"),
        ("/usr/share/doc/damselfly/changelog.Debian.gz", "-rw-r--r--"),
    ] {
        assert_eq!(
            contents.get(path).map(String::as_str),
            Some(mode),
            "{path} in\n{listing}"
        );
    }
    let control = scratch.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let read = |name: &str| fs::read_to_string(control.join(name)).unwrap();
    assert_eq!(
        read("conffiles"),
        "/etc/damselfly/dfdaemon.yml\n/etc/damselfly/supernode.env\n"
    );
    let postinst = read("postinst");
    assert!(
        postinst.contains("chmod 0700 /var/lib/damselfly"),
        "{postinst}"
    );
    // dfdaemon is enabled, not started (import-content comes first);
    // the supernode is neither (it needs its --advertise-ip).
    assert!(postinst.contains("deb-systemd-helper enable dfdaemon.service"));
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    // (it is only re-enabled on upgrades where the admin had enabled it).
    assert!(postinst.contains("if deb-systemd-helper debian-installed supernode.service"));
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/dfdaemon.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/dfdaemon") && unit.contains("Before=containerd.service")
    );

    // Into a throwaway root, maintainer scripts and all.
    let root = scratch.join("root");
    throwaway_root(&root);
    let deb_arg = deb.to_str().unwrap();
    let installed = dpkg(&root, &["-i", deb_arg]);
    assert!(
        installed.status.success(),
        "dpkg -i: {}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let status = text(&run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "damselfly"])));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let data = fs::metadata(root.join("var/lib/damselfly")).unwrap();
    assert_eq!(data.permissions().mode() & 0o7777, 0o700);
    assert!(root.join("etc/damselfly/dfdaemon.yml").is_file());
    let version = run(Command::new(root.join("usr/bin/dfdaemon")).arg("--version"));
    assert!(
        text(&version).starts_with("damselfly "),
        "{}",
        text(&version)
    );

    // prerm refuses while containerd is switched to dfdaemon.
    fs::create_dir_all(root.join("etc/containerd")).unwrap();
    let state = root.join("etc/containerd/config.toml.damselfly-state.json");
    fs::write(&state, "{}").unwrap();
    let refused = dpkg(&root, &["-r", "damselfly"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("containerd still uses dfdaemon"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(root.join("usr/bin/dfdaemon").exists());
    fs::remove_file(&state).unwrap();

    let purged = dpkg(&root, &["-P", "damselfly"]);
    assert!(
        purged.status.success(),
        "dpkg -P: {}",
        String::from_utf8_lossy(&purged.stderr)
    );
    for gone in [
        "usr/bin/dfdaemon",
        "etc/damselfly/dfdaemon.yml",
        "var/lib/damselfly",
        "usr/lib/systemd/system/dfdaemon.service",
    ] {
        assert!(!root.join(gone).exists(), "{gone} is left after purge");
    }
}
