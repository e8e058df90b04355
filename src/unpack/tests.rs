//! Tests of the layer applier on tars built in memory (run as root: they
//! chown, mknod and set trusted xattrs).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use filetime::FileTime;
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

/// The paths of implicit dirs, for comparisons.
fn paths(dirs: &[ImplicitDir]) -> Vec<String> {
    dirs.iter()
        .map(|d| d.path.to_string_lossy().into_owned())
        .collect()
}

fn apply(tar: &[u8], root: &Path) -> Result<Applied, UnpackError> {
    apply_layer(tar, Compression::None, root, &[], Whiteouts::Overlay)
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
    crate::require_root!();
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
    assert_eq!(paths(&applied.implicit_dirs), ["dev"]);
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
    crate::require_root!();
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
    assert_eq!(paths(&applied.implicit_dirs), ["d".repeat(120)]);
}

#[test]
fn replace_whiteouts_and_opaque() {
    crate::require_root!();
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
    crate::require_root!();
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
        Whiteouts::Overlay,
    )
    .unwrap();
    assert_eq!(paths(&applied.implicit_dirs), ["usr", "usr/lib"]);
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
    crate::require_root!();
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
        let applied = apply_layer(&blob[..], c, &d.root, &[], Whiteouts::Overlay).unwrap();
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
        ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            None,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            Gzip,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
            Zstd,
        ),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            Gzip,
        ),
        ("application/vnd.docker.image.rootfs.diff.tar", Detect),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar",
            Detect,
        ),
    ] {
        assert_eq!(Compression::from_media_type(t).unwrap(), c, "{t}");
    }
    for t in [
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/octet-stream",
    ] {
        assert!(Compression::from_media_type(t).is_err(), "{t}");
    }
}

#[test]
fn detect_reads_gzip_zstd_and_plain_tars() {
    crate::require_root!();
    let mut f = e("f", EntryType::Regular);
    f.body = b"detected";
    let t = tar(&[f]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&t).unwrap();
    let zst = zstd::encode_all(&t[..], 3).unwrap();
    for blob in [t.clone(), gz.finish().unwrap(), zst] {
        let d = dirs();
        let applied = apply_layer(
            &blob[..],
            Compression::Detect,
            &d.root,
            &[],
            Whiteouts::Overlay,
        )
        .unwrap();
        assert_eq!(applied.diff_id, crate::store::Digest::of(&t));
        assert_eq!(fs::read(d.root.join("f")).unwrap(), b"detected");
    }
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink_and_chmods_nothing() {
    crate::require_root!();
    let d = dirs();
    let outside = d.sentinel.join("outside");
    fs::write(&outside, b"host").unwrap();
    fs::set_permissions(
        &outside,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut dangling = e("dangling", EntryType::Symlink);
    dangling.link = "nowhere";
    let mut out = e("out", EntryType::Symlink);
    out.link = outside.to_str().unwrap();
    let hard = |name, link| {
        let mut h = e(name, EntryType::Link);
        h.link = link;
        h.mode = 0o777;
        h
    };
    let (h1, h2) = (hard("h1", "dangling"), hard("h2", "out"));
    apply(&tar(&[dangling, out, h1, h2]), &d.root).unwrap();
    assert_eq!(
        fs::read_link(d.root.join("h1")).unwrap(),
        Path::new("nowhere")
    );
    assert_eq!(fs::symlink_metadata(d.root.join("h2")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o7777, 0o600);
}

#[test]
fn pax_ids_beyond_ustar_and_trusted_xattrs_ignored() {
    crate::require_root!();
    let d = dirs();
    let mut f = e("f", EntryType::Regular);
    f.pax = vec![
        ("uid", b"3000000"),
        ("gid", b"3000001"),
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ("SCHILY.xattr.user.k", b"v"),
    ];
    apply(&tar(&[f]), &d.root).unwrap();
    let p = d.root.join("f");
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid()), (3_000_000, 3_000_001));
    assert_eq!(xattr::get(&p, "trusted.overlay.opaque").unwrap(), None);
    assert_eq!(xattr::get(&p, "user.k").unwrap().unwrap(), b"v");
    let mut bad = e("g", EntryType::Regular);
    bad.pax = vec![("uid", b"-1")];
    assert_refused(&[bad], |e| matches!(e, UnpackError::BadTar(_)));
}

#[test]
fn whiteouts_over_layers_are_mode_0_devices_of_the_entry_owner() {
    crate::require_root!();
    let d = dirs();
    let mut w = e("a/.wh.gone", EntryType::Regular);
    w.uid = 7;
    apply(&tar(&[w]), &d.root).unwrap();
    let gone = fs::symlink_metadata(d.root.join("a/gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!((gone.mode() & 0o7777, gone.uid(), gone.rdev()), (0, 7, 0));
}

#[test]
fn bottom_layer_whiteouts_remove_and_opaque_keeps_only_this_layers_entries() {
    crate::require_root!();
    let d = dirs();
    let t = tar(&[
        e("a", EntryType::Regular),
        e(".wh.a", EntryType::Regular),
        e(".wh.ghost", EntryType::Regular),
        e("o/", EntryType::Directory),
        e("o/kept", EntryType::Regular),
        e("o/implicit/f", EntryType::Regular),
        e("o/.wh..wh..opq", EntryType::Regular),
        e("o/after", EntryType::Regular),
    ]);
    apply_layer(&t[..], Compression::None, &d.root, &[], Whiteouts::Remove).unwrap();
    let mut names: Vec<_> = fs::read_dir(d.root.join("o"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["after", "kept"],
        "an implicit dir is not this layer's"
    );
    assert!(fs::symlink_metadata(d.root.join("a")).is_err());
    assert!(fs::symlink_metadata(d.root.join("ghost")).is_err());
    assert_eq!(
        xattr::get(d.root.join("o"), "trusted.overlay.opaque").unwrap(),
        None
    );
}

#[test]
fn symlinked_parents_resolve_inside_the_root() {
    crate::require_root!();
    let d = dirs();
    let link = |name, target| {
        let mut l = e(name, EntryType::Symlink);
        l.link = target;
        l
    };
    let mut hard = e("h", EntryType::Link);
    hard.link = "abs/f";
    let t = tar(&[
        link("abs", "/s"),
        e("abs/f", EntryType::Regular),
        link("rel", "x/../y"),
        e("rel/g", EntryType::Regular),
        link("up", "../../.."),
        e("up/escaped", EntryType::Regular),
        hard,
        link("loop", "loop"),
    ]);
    apply(&t, &d.root).unwrap();
    let r = &d.root;
    assert!(r.join("s/f").is_file() && r.join("y/g").is_file() && r.join("escaped").is_file());
    assert_eq!(
        fs::metadata(r.join("s/f")).unwrap().nlink(),
        2,
        "h links s/f"
    );
    assert_eq!(outside(&d), Vec::<PathBuf>::new());
    let err = apply(
        &tar(&[link("loop", "loop"), e("loop/f", EntryType::Regular)]),
        &dirs().root,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::PathEscape { .. }), "{err}");
}

#[test]
fn implicit_parents_follow_lower_symlinks_and_skip_trusted_xattrs() {
    crate::require_root!();
    let d = dirs();
    let lower = d.sentinel.join("lower");
    fs::create_dir_all(lower.join("usr/lib")).unwrap();
    fs::set_permissions(
        lower.join("usr/lib"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink("/usr/lib", lower.join("lib")).unwrap();
    fs::create_dir(lower.join("o")).unwrap();
    xattr::set(lower.join("o"), "trusted.overlay.opaque", b"y").unwrap();
    let t = tar(&[e("lib/f", EntryType::Regular), e("o/f", EntryType::Regular)]);
    apply_layer(
        &t[..],
        Compression::None,
        &d.root,
        std::slice::from_ref(&lower),
        Whiteouts::Overlay,
    )
    .unwrap();
    assert_eq!(
        fs::metadata(d.root.join("lib")).unwrap().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        xattr::get(d.root.join("o"), "trusted.overlay.opaque").unwrap(),
        None
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
    crate::require_root!();
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
    let err = apply_layer(
        &gz[..gz.len() / 2],
        Compression::Gzip,
        &d.root,
        &[],
        Whiteouts::Overlay,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::BadCompression { .. }), "{err}");
}

#[test]
fn times_out_of_range_are_the_epoch() {
    crate::require_root!();
    let d = dirs();
    let timed = |name, mtime: &'static [u8]| {
        let mut f = e(name, EntryType::Regular);
        f.pax = vec![("mtime", mtime)];
        f
    };
    let mut huge = e("huge", EntryType::Regular);
    huge.mtime = 0o77777777777;
    apply(
        &tar(&[
            timed("before", b"-100.5"),
            timed("after", b"32503680000"),
            huge,
        ]),
        &d.root,
    )
    .unwrap();
    for name in ["before", "after"] {
        let m = fs::metadata(d.root.join(name)).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec(), m.atime()), (0, 0, 0), "{name}");
    }
    assert_eq!(
        fs::metadata(d.root.join("huge")).unwrap().mtime(),
        0o77777777777
    );
}

#[test]
fn implicit_dirs_end_alike_applied_over_parents_or_inherited_later() {
    crate::require_root!();
    let d = dirs();
    let lower = d.sentinel.join("lower");
    for dir in ["described", "childless", "written"] {
        fs::create_dir_all(lower.join(dir)).unwrap();
        fs::set_permissions(
            lower.join(dir),
            std::os::unix::fs::PermissionsExt::from_mode(0o750),
        )
        .unwrap();
        xattr::set(lower.join(dir), "user.lower", b"1").unwrap();
        filetime::set_file_mtime(lower.join(dir), FileTime::from_unix_time(1234, 0)).unwrap();
    }
    let mut described = e("described/", EntryType::Directory);
    described.mode = 0o705;
    described.mtime = 99;
    let mut setgid = e("sg/", EntryType::Directory);
    setgid.mode = 0o2775;
    let t = tar(&[
        e("described/f", EntryType::Regular),
        described,
        e("childless/.wh..wh..opq", EntryType::Regular),
        e("written/f", EntryType::Regular),
        setgid,
        e("sg/implicit/f", EntryType::Regular),
    ]);
    let over = d.sentinel.join("over");
    let later = d.sentinel.join("later");
    for root in [&over, &later] {
        fs::create_dir(root).unwrap();
    }
    let parents = std::slice::from_ref(&lower);
    apply_layer(
        &t[..],
        Compression::None,
        &over,
        parents,
        Whiteouts::Overlay,
    )
    .unwrap();
    let applied = apply(&t, &later).unwrap();
    inherit_implicit_dirs(&later, &applied.implicit_dirs, parents).unwrap();
    for root in [&over, &later] {
        let attrs = |dir: &str| {
            let m = fs::metadata(root.join(dir)).unwrap();
            let x = xattr::get(root.join(dir), "user.lower").unwrap();
            (m.mode() & 0o7777, m.mtime(), x)
        };
        let one = Some(b"1".to_vec());
        assert_eq!(attrs("described"), (0o705, 99, one.clone()), "{root:?}");
        assert_eq!(attrs("childless"), (0o750, 1234, one.clone()), "{root:?}");
        let (mode, mtime, x) = attrs("written");
        assert!((mode, x) == (0o750, one) && mtime > 1234, "{root:?}");
        assert_eq!(
            attrs("sg/implicit").0,
            0o755,
            "{root:?}: not the setgid parent's"
        );
    }
}
