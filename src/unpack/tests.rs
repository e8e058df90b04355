//! Tests of the layer applier on tars built in memory (run as root: they
//! chown, mknod and set trusted xattrs).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

/// One tar entry, written with raw names so bad names can be built too.
struct E<'a> {
    name: &'a str,
    kind: EntryType,
    mode: u32,
    body: &'a [u8],
    link: &'a str,
    uid: u64,
    mtime: u64,
    pax: Vec<(&'a str, &'a [u8])>,
}

fn e(name: &str, kind: EntryType) -> E<'_> {
    E {
        name,
        kind,
        mode: 0o644,
        body: b"",
        link: "",
        uid: 0,
        mtime: 1_000_000,
        pax: Vec::new(),
    }
}

fn tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for x in entries {
        if !x.pax.is_empty() {
            b.append_pax_extensions(x.pax.iter().copied()).unwrap();
        }
        let mut h = Header::new_gnu();
        h.set_entry_type(x.kind);
        h.set_mode(x.mode);
        h.set_uid(x.uid);
        h.set_gid(x.uid + 1);
        h.set_mtime(x.mtime);
        h.set_size(x.body.len() as u64);
        if x.kind == EntryType::Block || x.kind == EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        if x.name.len() < 100 && x.link.len() < 100 {
            let old = h.as_old_mut();
            old.name[..x.name.len()].copy_from_slice(x.name.as_bytes());
            old.linkname[..x.link.len()].copy_from_slice(x.link.as_bytes());
            h.set_cksum();
            b.append(&h, x.body).unwrap();
        } else if x.link.is_empty() {
            b.append_data(&mut h, x.name, x.body).unwrap();
        } else {
            b.append_link(&mut h, x.name, x.link).unwrap();
        }
    }
    b.into_inner().unwrap()
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    sentinel: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a/b/root");
    fs::create_dir_all(&root).unwrap();
    let sentinel = tmp.path().join("a");
    Dirs {
        _tmp: tmp,
        root,
        sentinel,
    }
}

fn apply(tar: &[u8], root: &Path) -> Result<Applied, UnpackError> {
    apply_layer(tar, Compression::None, root, &[])
}

/// Everything under the sentinel but the root.
fn outside(d: &Dirs) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![d.sentinel.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p == d.root || p == d.root.parent().unwrap() {
                if p != d.root {
                    stack.push(p);
                }
                continue;
            }
            found.push(p);
        }
    }
    found
}

#[test]
fn file_types_modes_owners_times() {
    let d = dirs();
    let mut setuid = e("bin/su", EntryType::Regular);
    setuid.mode = 0o4755;
    setuid.uid = 1000;
    setuid.body = b"suid";
    let mut dir = e("bin", EntryType::Directory);
    dir.mode = 0o3775;
    dir.mtime = 1234;
    let mut link = e("bin/sh", EntryType::Symlink);
    link.link = "su";
    // containerd applies the link's own header to the shared inode: as real tars do, repeat it.
    let mut hard = e("bin/su2", EntryType::Link);
    hard.link = "bin/su";
    hard.mode = 0o4755;
    hard.uid = 1000;
    let t = tar(&[
        dir,
        setuid,
        link,
        hard,
        e("dev/null", EntryType::Char),
        e("dev/blk", EntryType::Block),
        e("dev/fifo", EntryType::Fifo),
    ]);
    let applied = apply(&t, &d.root).unwrap();
    assert_eq!(applied.entries, 7);
    assert_eq!(applied.implicit_dirs, vec![PathBuf::from("dev")]);
    let r = &d.root;
    let su = fs::metadata(r.join("bin/su")).unwrap();
    assert_eq!(
        (su.mode() & 0o7777, su.uid(), su.gid(), su.nlink()),
        (0o4755, 1000, 1001, 2)
    );
    assert_eq!(fs::read(r.join("bin/su2")).unwrap(), b"suid");
    assert_eq!(fs::read_link(r.join("bin/sh")).unwrap(), Path::new("su"));
    let bin = fs::metadata(r.join("bin")).unwrap();
    assert_eq!(
        (bin.mode() & 0o7777, bin.mtime()),
        (0o3775, 1234),
        "dir times set after children"
    );
    let null = fs::symlink_metadata(r.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(
        fs::symlink_metadata(r.join("dev/blk"))
            .unwrap()
            .file_type()
            .is_block_device()
    );
    assert!(
        fs::symlink_metadata(r.join("dev/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(su.mtime(), 1_000_000);
    assert_eq!(fs::metadata(r.join("dev")).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn xattrs_pax_long_names_and_times() {
    let d = dirs();
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
    let mut f = e(&long, EntryType::Regular);
    f.uid = 5;
    f.mode = 0o755;
    let cap: &[u8] = &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.pax = vec![
        ("SCHILY.xattr.security.capability", cap),
        ("SCHILY.xattr.user.k", b"v"),
        ("mtime", b"1500000000.25"),
    ];
    let applied = apply(&tar(&[f]), &d.root).unwrap();
    let p = d.root.join(&long);
    assert_eq!(xattr::get(&p, "security.capability").unwrap().unwrap(), cap);
    assert_eq!(xattr::get(&p, "user.k").unwrap().unwrap(), b"v");
    let m = fs::metadata(&p).unwrap();
    assert_eq!(
        (m.mtime(), m.mtime_nsec(), m.uid()),
        (1_500_000_000, 250_000_000, 5)
    );
    assert_eq!(applied.implicit_dirs, vec![PathBuf::from("d".repeat(120))]);
}

#[test]
fn replace_whiteouts_and_opaque() {
    let d = dirs();
    let mut f = e("x", EntryType::Regular);
    f.body = b"file";
    let t = tar(&[
        e("x/", EntryType::Directory),
        e("x/inner", EntryType::Regular),
        f,
        e("y", EntryType::Regular),
        e("y", EntryType::Directory),
        e("o", EntryType::Directory),
        e("o/.wh..wh..opq", EntryType::Regular),
        e("etc/.wh.gone", EntryType::Regular),
    ]);
    apply(&t, &d.root).unwrap();
    assert_eq!(fs::read(d.root.join("x")).unwrap(), b"file");
    assert!(d.root.join("y").is_dir());
    assert_eq!(
        xattr::get(d.root.join("o"), "trusted.overlay.opaque")
            .unwrap()
            .unwrap(),
        b"y"
    );
    assert!(!d.root.join("o/.wh..wh..opq").exists());
    let gone = fs::symlink_metadata(d.root.join("etc/gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
}

#[test]
fn implicit_parents_copy_lower_attrs_and_inherit() {
    let d = dirs();
    let lower = d.sentinel.join("lower");
    fs::create_dir_all(lower.join("usr/lib")).unwrap();
    nix::unistd::chown(&lower.join("usr"), Some(7.into()), Some(8.into())).unwrap();
    fs::set_permissions(
        lower.join("usr"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1750),
    )
    .unwrap();
    xattr::set(lower.join("usr"), "user.a", b"b").unwrap();
    let t = tar(&[e("usr/lib/f", EntryType::Regular)]);
    let applied = apply_layer(
        &t[..],
        Compression::None,
        &d.root,
        std::slice::from_ref(&lower),
    )
    .unwrap();
    assert_eq!(
        applied.implicit_dirs,
        vec![PathBuf::from("usr"), PathBuf::from("usr/lib")]
    );
    let check = |root: &Path| {
        let usr = fs::metadata(root.join("usr")).unwrap();
        assert_eq!((usr.mode() & 0o7777, usr.uid(), usr.gid()), (0o1750, 7, 8));
        assert_eq!(
            xattr::get(root.join("usr"), "user.a").unwrap().unwrap(),
            b"b"
        );
    };
    check(&d.root);
    let later = d.sentinel.join("later");
    fs::create_dir(&later).unwrap();
    let applied = apply(&t, &later).unwrap();
    assert_eq!(
        fs::metadata(later.join("usr")).unwrap().mode() & 0o7777,
        0o755
    );
    inherit_implicit_dirs(&later, &applied.implicit_dirs, &[lower]).unwrap();
    check(&later);
}

#[test]
fn diff_id_covers_the_whole_stream_in_every_compression() {
    let mut f = e("f", EntryType::Regular);
    let body = vec![7u8; 100_000];
    f.body = &body;
    let mut t = tar(&[f]);
    t.extend_from_slice(&[0u8; 4096]);
    let want = crate::store::Digest::of(&t);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&t).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&t[..], 3).unwrap();
    for (blob, c) in [
        (&t, Compression::None),
        (&gz, Compression::Gzip),
        (&zst, Compression::Zstd),
    ] {
        let d = dirs();
        let applied = apply_layer(&blob[..], c, &d.root, &[]).unwrap();
        assert_eq!(applied.diff_id, want, "{c:?}");
        assert_eq!(applied.tar_bytes, t.len() as u64);
        assert_eq!(fs::read(d.root.join("f")).unwrap(), body);
    }
}

#[test]
fn media_types() {
    use Compression::*;
    for (t, c) in [
        ("application/vnd.oci.image.layer.v1.tar", None),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
    ] {
        assert_eq!(Compression::from_media_type(t).unwrap(), c);
    }
    assert!(
        Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
            .is_err()
    );
}

fn assert_refused(entries: &[E], check: impl Fn(&UnpackError) -> bool) {
    let d = dirs();
    let err = apply(&tar(entries), &d.root).unwrap_err();
    assert!(check(&err), "{err}");
    assert_eq!(outside(&d), Vec::<PathBuf>::new(), "{err}");
}

#[test]
fn bad_layers_write_nothing_outside() {
    let escape = |e: &UnpackError| matches!(e, UnpackError::PathEscape { .. });
    assert_refused(&[e("../../x", EntryType::Regular)], escape);
    assert_refused(&[e("a/../../../x", EntryType::Directory)], escape);
    let mut link = e("link", EntryType::Symlink);
    link.link = "../..";
    assert_refused(&[link, e("link/file", EntryType::Regular)], escape);
    let mut hard = e("h", EntryType::Link);
    hard.link = "../../etc/passwd";
    assert_refused(&[hard], escape);
    let mut hard = e("h", EntryType::Link);
    hard.link = "/etc/passwd";
    assert_refused(&[hard], |e| matches!(e, UnpackError::Io { .. }));
    for kind in [EntryType::Continuous, EntryType::new(b'Z')] {
        assert_refused(&[e("s", kind)], |e| {
            matches!(e, UnpackError::UnsupportedEntry { .. })
        });
    }
}

#[test]
fn absolute_names_land_under_root() {
    let d = dirs();
    let mut dot = e("./", EntryType::Directory);
    dot.mode = 0o700;
    apply(
        &tar(&[
            dot,
            e("/abs", EntryType::Regular),
            e(".", EntryType::Regular),
        ]),
        &d.root,
    )
    .unwrap();
    assert!(d.root.join("abs").is_file());
    assert_eq!(
        fs::metadata(&d.root).unwrap().mode() & 0o777,
        0o755,
        "the root entry is ignored"
    );
}

#[test]
fn truncated_gzip_is_a_compression_error() {
    let mut f = e("f", EntryType::Regular);
    let body: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    f.body = &body;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar(&[f])).unwrap();
    let gz = gz.finish().unwrap();
    let d = dirs();
    let err = apply_layer(&gz[..gz.len() / 2], Compression::Gzip, &d.root, &[]).unwrap_err();
    assert!(matches!(err, UnpackError::BadCompression { .. }), "{err}");
}
