use super::*;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn open() -> (tempfile::TempDir, Snapshotter) {
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = Snapshotter::open(dir.path()).unwrap();
    (dir, snapshotter)
}

/// Prepares `key` over `parent`, writes `file` into it and commits it as `name`.
fn layer(sn: &Snapshotter, name: &str, parent: &str, file: &str) {
    let key = format!("{name}-active");
    let mounts = sn.prepare(&key, parent, HashMap::new()).unwrap();
    let upper = match mounts[0].fs_type.as_str() {
        "bind" => PathBuf::from(&mounts[0].source),
        _ => PathBuf::from(
            mounts[0]
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap(),
        ),
    };
    fs::write(upper.join(file), file).unwrap();
    sn.commit(name, &key, HashMap::new()).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_chain_of_layers_mounts_as_overlay_nearest_first() {
    let (_dir, sn) = open();
    layer(&sn, "ns/1/base", "", "a");
    layer(&sn, "ns/2/top", "ns/1/base", "b");
    let lowers = sn.lower_dirs("ns/2/top").unwrap();
    assert_eq!(lowers.len(), 2);
    assert!(lowers[0].join("b").is_file() && lowers[1].join("a").is_file());

    let mounts = sn
        .prepare("ns/3/container", "ns/2/top", HashMap::new())
        .unwrap();
    let lowerdir = format!("lowerdir={}:{}", lowers[0].display(), lowers[1].display());
    assert_eq!(mounts[0].fs_type, "overlay");
    assert_eq!(mounts[0].options.last(), Some(&lowerdir));
    assert_eq!(sn.mounts("ns/3/container").unwrap(), mounts);

    let view = sn.view("ns/4/view", "ns/1/base", HashMap::new()).unwrap();
    assert_eq!(view[0].fs_type, "bind");
    assert_eq!(PathBuf::from(&view[0].source), lowers[1]);
    assert_eq!(view[0].options, ["ro", "rbind"]);
}

#[test]
fn stat_list_and_update_report_what_was_made() {
    let (_dir, sn) = open();
    layer(&sn, "base", "", "a");
    sn.prepare("work", "base", labels(&[("x", "1"), ("y", "2")]))
        .unwrap();
    let info = sn.stat("work").unwrap();
    assert_eq!((info.kind, info.parent.as_str()), (Kind::Active, "base"));
    assert_eq!(info.created_at, info.updated_at);
    let updated = sn
        .update("work", LabelUpdate::Keys(labels(&[("x", ""), ("z", "3")])))
        .unwrap();
    assert_eq!(updated.labels, labels(&[("y", "2"), ("z", "3")]));
    assert!(updated.updated_at > info.updated_at);
    assert_eq!(updated.created_at, info.created_at);
    let names: Vec<_> = sn.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["base", "work"]);
}

#[test]
fn errors_are_those_containerd_expects() {
    let (_dir, sn) = open();
    layer(&sn, "base", "", "a");
    sn.prepare("active", "base", HashMap::new()).unwrap();
    sn.view("view", "base", HashMap::new()).unwrap();
    let cases = [
        sn.prepare("active", "", HashMap::new()).err(),
        sn.prepare("new", "missing", HashMap::new()).err(),
        sn.prepare("new", "active", HashMap::new()).err(),
        sn.prepare("", "", HashMap::new()).err(),
        sn.commit("base", "active", HashMap::new()).err(),
        sn.commit("c", "view", HashMap::new()).err(),
        sn.commit("c", "missing", HashMap::new()).err(),
        sn.remove("base").err(),
        sn.remove("missing").err(),
        sn.mounts("base").err(),
        sn.prepare(&"k".repeat(MAX_KEY_LEN + 1), "", HashMap::new())
            .err(),
    ];
    let kinds: Vec<&str> = cases
        .iter()
        .map(|e| match e {
            Some(SnapshotError::AlreadyExists(_)) => "exists",
            Some(SnapshotError::NotFound(_)) => "not found",
            Some(SnapshotError::InvalidArgument(_)) => "invalid",
            Some(SnapshotError::FailedPrecondition(_)) => "precondition",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "exists",
            "not found",
            "invalid",
            "invalid",
            "exists",
            "precondition",
            "not found",
            "precondition",
            "not found",
            "precondition",
            "invalid",
        ]
    );
    // Nothing of the failed calls is left behind.
    assert_eq!(sn.list().unwrap().len(), 3);
}

#[test]
fn removing_children_frees_the_parent_and_its_directory() {
    let (dir, sn) = open();
    layer(&sn, "base", "", "a");
    layer(&sn, "top", "base", "b");
    let base_dir = sn.lower_dirs("base").unwrap()[0]
        .parent()
        .unwrap()
        .to_owned();
    assert!(sn.remove("base").is_err());
    sn.remove("top").unwrap();
    sn.remove("base").unwrap();
    assert!(!base_dir.exists());
    assert_eq!(entries(&dir.path().join("snapshots")), ["metadata.redb"]);
}

#[test]
fn usage_is_measured_live_for_active_and_at_commit_for_committed() {
    let (_dir, sn) = open();
    let mounts = sn.prepare("a", "", HashMap::new()).unwrap();
    let fs_dir = PathBuf::from(&mounts[0].source);
    let empty = sn.usage("a").unwrap();
    assert_eq!(empty.inodes, 1);
    fs::write(fs_dir.join("f"), vec![7u8; 32 << 10]).unwrap();
    let written = sn.usage("a").unwrap();
    assert_eq!(written.inodes, 2);
    assert!(written.size >= 32 << 10);
    sn.commit("c", "a", HashMap::new()).unwrap();
    assert_eq!(sn.usage("c").unwrap(), written);
}

#[test]
fn cleanup_and_open_remove_what_no_record_names_but_spare_live_stagings() {
    let (dir, sn) = open();
    layer(&sn, "base", "", "a");
    let root = dir.path().join("snapshots");
    // What a crash leaves: a staging directory and a renamed, unrecorded one.
    fs::create_dir_all(root.join("new-99/fs")).unwrap();
    fs::create_dir_all(root.join("77/fs")).unwrap();
    let staging = sn.stage().unwrap();
    sn.cleanup().unwrap();
    assert!(staging.fs().is_dir(), "a live staging was removed");
    let staged = staging.fs().parent().unwrap().to_owned();
    let mut expected = vec![
        "1",
        "metadata.redb",
        staged.file_name().unwrap().to_str().unwrap(),
    ];
    expected.sort();
    assert_eq!(entries(&root), expected);

    drop(staging);
    drop(sn);
    fs::create_dir_all(root.join("new-0/fs")).unwrap();
    fs::create_dir_all(root.join("2/fs")).unwrap();
    let sn = Snapshotter::open(dir.path()).unwrap();
    assert_eq!(entries(&root), ["1", "metadata.redb"]);
    assert_eq!(sn.stat("base").unwrap().kind, Kind::Committed);
    // Ids go on from where they were: the next snapshot does not collide.
    layer(&sn, "next", "base", "b");
}

#[test]
fn a_staged_unpack_commits_atomically_and_is_found_by_its_ref() {
    let (dir, sn) = open();
    layer(&sn, "base", "", "a");
    let target = "sha256:1234";
    let ref_labels = labels(&[(SNAPSHOT_REF_LABEL, target)]);
    assert_eq!(sn.find_committed(target, "base").unwrap(), None);

    let staging = sn.stage().unwrap();
    fs::write(staging.fs().join("unpacked"), "x").unwrap();
    sn.commit_staged(staging, "layer", "base", ref_labels.clone())
        .unwrap();
    assert_eq!(
        sn.find_committed(target, "base").unwrap().as_deref(),
        Some("layer")
    );
    assert_eq!(sn.find_committed(target, "").unwrap(), None);
    let lowers = sn.lower_dirs("layer").unwrap();
    assert!(lowers[0].join("unpacked").is_file());
    assert!(lowers[1].join("a").is_file());
    assert!(sn.usage("layer").unwrap().inodes == 2);

    // A name taken, or a parent that is not committed: nothing is left.
    let staging = sn.stage().unwrap();
    assert!(matches!(
        sn.commit_staged(staging, "layer", "", ref_labels.clone()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    sn.prepare("active", "", HashMap::new()).unwrap();
    let staging = sn.stage().unwrap();
    assert!(matches!(
        sn.commit_staged(staging, "other", "active", ref_labels),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(
        sn.lower_dirs("active"),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert_eq!(
        entries(&dir.path().join("snapshots")),
        ["1", "2", "3", "metadata.redb"]
    );
}

#[test]
fn an_active_snapshot_takes_its_parents_root_owner_and_mode() {
    crate::require_root!();
    let (_dir, sn) = open();
    layer(&sn, "base", "", "a");
    let base_fs = sn.lower_dirs("base").unwrap().remove(0);
    std::os::unix::fs::lchown(&base_fs, Some(1), Some(2)).unwrap();
    let mounts = sn.prepare("child", "base", HashMap::new()).unwrap();
    let upper = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    let meta = fs::metadata(upper).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1, 2));
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
}
