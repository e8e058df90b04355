//! Files and sockets private by default (issue 8, "Must be shown" 6):
//! dfdaemon started as the README's plain command line (no systemd unit)
//! with umask 0022 keeps nothing under its data dir that another user can
//! read or write, and its plugin sockets are 0660.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Dfdaemon, Scratch, sha256_bytes};

#[test]
fn with_umask_0022_nothing_under_the_data_dir_is_open_to_others() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let scratch = Scratch::new();
    let snapshot_socket = scratch.join("snap.sock");
    let dfdaemon = Dfdaemon::start_in(
        &scratch,
        "dfdaemon",
        None,
        vec![
            "--snapshot-socket".into(),
            snapshot_socket.display().to_string(),
        ],
    );
    // The blob is written straight to dfdaemon's content socket (ctr speaks
    // the Content service to it): `ctr content ingest` through containerd
    // takes no lease, so containerd's startup GC could delete the fresh,
    // unreferenced blob before the modes are checked.
    let blob = b"a blob no other user may read".repeat(1000);
    let digest = sha256_bytes(&blob);
    let mut ingest = Command::new("ctr")
        .arg("--address")
        .arg(&dfdaemon.socket)
        .args(["--namespace", "test", "content", "ingest"])
        .arg(format!("--expected-digest={digest}"))
        .arg(format!("--expected-size={}", blob.len()))
        .arg("private-blob")
        .stdin(Stdio::piped())
        .spawn()
        .expect("run ctr content ingest");
    ingest.stdin.take().unwrap().write_all(&blob).unwrap();
    assert!(
        ingest.wait().unwrap().success(),
        "ctr content ingest failed"
    );
    assert_eq!(
        fs::read(dfdaemon.blob_path(&digest)).expect("the blob is in the store"),
        blob
    );

    let mut open_to_others = Vec::new();
    for path in walk(&dfdaemon.data_dir) {
        let mode = fs::symlink_metadata(&path).unwrap().permissions().mode();
        if mode & 0o007 != 0 {
            open_to_others.push(format!("{:o} {}", mode & 0o7777, path.display()));
        }
    }
    assert!(
        open_to_others.is_empty(),
        "open to other users:\n{}",
        open_to_others.join("\n")
    );
    let data_dir_mode = fs::metadata(&dfdaemon.data_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(data_dir_mode & 0o777, 0o700, "the data dir");
    for socket in [&dfdaemon.socket, &snapshot_socket] {
        let meta = fs::metadata(socket).unwrap();
        assert!(meta.file_type().is_socket(), "{}", socket.display());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o660,
            "{}",
            socket.display()
        );
    }
}

/// `dir` and everything below it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
