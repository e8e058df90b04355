//! `dfdaemon containerd-config install|uninstall`: edits containerd's
//! `config.toml` (with `toml_edit`, so comments, order and every unrelated
//! setting stay as they are) to make dfdaemon containerd's content store and
//! CRI's snapshotter:
//!
//! - `disabled_plugins` gets `io.containerd.content.v1.content` (with the
//!   built-in store loaded containerd may pick it instead of dfdaemon);
//! - `[proxy_plugins.damselfly-content]` (type `content`) and
//!   `[proxy_plugins.damselfly]` (type `snapshot`) point at dfdaemon's sockets;
//! - CRI's `snapshotter = "damselfly"` and its registry `config_path` (the
//!   hosts.toml dir dfdaemon's fast path reads too), set only where empty.
//!
//! Config version 2 (containerd 1.6, 1.7) and 3 (2.x) are understood; any
//! other, or a config that cannot take the change safely (another content
//! proxy plugin, a `damselfly` plugin pointing elsewhere, legacy CRI
//! `registry.mirrors`, which containerd refuses next to `config_path`), is
//! refused with the reason and left untouched.
//!
//! **How uninstall gives the file back.** Install keeps the original bytes
//! in `<config>.damselfly-backup` and records in `<config>.damselfly-state.json`
//! the SHA-256 of the file it wrote and each edit it made (with the value it
//! replaced). Uninstall restores the backup byte for byte when the file is
//! still what install wrote; when something else changed it since, it undoes
//! only the recorded edits and keeps the other changes. Installing again is a
//! no-op when nothing is missing (and keeps the first backup).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use toml_edit::{Array, DocumentMut, Item, Table, Value};

/// The proxy plugin name of dfdaemon's content store. Not `content`: that
/// ID is the built-in store's, and containerd 1.6 panics on the clash.
pub const CONTENT_PLUGIN: &str = "damselfly-content";
/// The proxy plugin name of dfdaemon's snapshotter, CRI's `snapshotter`.
pub const SNAPSHOT_PLUGIN: &str = "damselfly";
/// containerd's built-in content store.
pub const BUILTIN_CONTENT: &str = "io.containerd.content.v1.content";

/// What install points containerd at.
#[derive(Debug, Clone)]
pub struct Settings {
    pub content_socket: PathBuf,
    pub snapshot_socket: PathBuf,
    /// CRI's registry `config_path`, if the config has none.
    pub hosts_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            content_socket: crate::config::CONTENT_SOCKET.into(),
            snapshot_socket: crate::config::SNAPSHOT_SOCKET.into(),
            hosts_dir: crate::registry::RegistryConfig::default().hosts_dir,
        }
    }
}

/// One edit install made, recorded so that uninstall can undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A table (path of keys) that did not exist was created.
    Table { path: Vec<String> },
    /// `name` was appended to `disabled_plugins`, which was created if `created`.
    Disabled { name: String, created: bool },
    /// The string key at `path` was set; it was `before` (absent if `None`).
    Value {
        path: Vec<String>,
        before: Option<String>,
    },
}

/// What install or uninstall did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Report {
    pub changed: bool,
    /// Unified diff of the config, old to new.
    pub diff: String,
    /// Things the operator should know (kept settings, what to do next).
    pub notes: Vec<String>,
}

/// What install leaves next to the config.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    /// SHA-256 (hex) of the config as install wrote it.
    installed_sha256: String,
    /// Every edit, in the order made.
    changes: Vec<Change>,
}

/// The config format's version, which says where CRI's settings live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// containerd 1.6 and 1.7.
    V2,
    /// containerd 2.x.
    V3,
}

impl Version {
    fn of(doc: &DocumentMut) -> anyhow::Result<Self> {
        match doc.get("version").map(|v| v.as_integer()) {
            None => bail!(
                "the config has no `version`, so containerd reads it as version 1, which damselfly \
                 does not edit: convert it to version 2 (containerd 1.6/1.7) or 3 (containerd 2.x, \
                 `containerd config migrate`) first"
            ),
            Some(None) => bail!("`version` is not an integer"),
            Some(Some(2)) => Ok(Self::V2),
            Some(Some(3)) => Ok(Self::V3),
            Some(Some(other)) => {
                bail!("config version {other} is not supported: damselfly edits versions 2 and 3")
            }
        }
    }

    /// The table holding CRI's `snapshotter`.
    fn snapshotter_table(self) -> &'static [&'static str] {
        match self {
            Self::V2 => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
            Self::V3 => &["plugins", "io.containerd.cri.v1.images"],
        }
    }

    /// The table holding CRI's registry settings (`config_path`, `mirrors`).
    fn registry_table(self) -> &'static [&'static str] {
        match self {
            Self::V2 => &["plugins", "io.containerd.grpc.v1.cri", "registry"],
            Self::V3 => &["plugins", "io.containerd.cri.v1.images", "registry"],
        }
    }
}

/// The backup of the original config.
pub fn backup_path(config: &Path) -> PathBuf {
    sibling(config, "damselfly-backup")
}

/// The record of what install changed.
pub fn state_path(config: &Path) -> PathBuf {
    sibling(config, "damselfly-state.json")
}

fn sibling(config: &Path, suffix: &str) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{suffix}"));
    config.with_file_name(name)
}

/// Installs dfdaemon into the config at `config` (see the module doc).
pub fn install(config: &Path, settings: &Settings, dry_run: bool) -> anyhow::Result<Report> {
    let text = fs::read_to_string(config).with_context(|| {
        format!(
            "read {} (containerd without a config file: write its defaults first, \
             `containerd config default > {}`)",
            config.display(),
            config.display()
        )
    })?;
    let (new_text, changes, notes) = plan_install(&text, settings)
        .with_context(|| format!("cannot install damselfly into {}", config.display()))?;
    let mut report = Report {
        changed: new_text != text,
        diff: diff(config, &text, &new_text),
        notes,
    };
    if !report.changed {
        report
            .notes
            .push(format!("{} already uses damselfly", config.display()));
        return Ok(report);
    }
    if dry_run {
        return Ok(report);
    }
    let state_file = state_path(config);
    let mut state = match read_state(&state_file)? {
        Some(state) => state,
        None => {
            write_atomically(&backup_path(config), text.as_bytes(), config)?;
            State {
                installed_sha256: String::new(),
                changes: Vec::new(),
            }
        }
    };
    for change in changes {
        // A value already recorded keeps the one it had before the first install.
        let known = matches!(&change, Change::Value { path, .. }
            if state.changes.iter().any(|c| matches!(c, Change::Value { path: p, .. } if p == path)));
        if !known {
            state.changes.push(change);
        }
    }
    state.installed_sha256 = sha256_hex(new_text.as_bytes());
    write_state(&state_file, &state, config)?;
    write_atomically(config, new_text.as_bytes(), config)?;
    report.notes.push(format!(
        "backup of the original: {}; restart containerd once dfdaemon serves its sockets",
        backup_path(config).display()
    ));
    Ok(report)
}

/// Undoes [`install`] (see the module doc).
pub fn uninstall(config: &Path, dry_run: bool) -> anyhow::Result<Report> {
    let state_file = state_path(config);
    let Some(state) = read_state(&state_file)? else {
        bail!(
            "no install record {} next to {}: damselfly was not installed there by \
             `dfdaemon containerd-config install`, nothing to undo",
            state_file.display(),
            config.display()
        );
    };
    let text = fs::read_to_string(config).with_context(|| format!("read {}", config.display()))?;
    let mut notes = Vec::new();
    let new_text = if sha256_hex(text.as_bytes()) == state.installed_sha256 {
        let backup = backup_path(config);
        fs::read_to_string(&backup)
            .with_context(|| format!("read the backup {}", backup.display()))?
    } else {
        notes.push(format!(
            "{} changed since install: undoing damselfly's edits only, keeping the rest",
            config.display()
        ));
        plan_uninstall(&text, &state.changes)
            .with_context(|| format!("cannot uninstall damselfly from {}", config.display()))?
    };
    let report = Report {
        changed: new_text != text,
        diff: diff(config, &text, &new_text),
        notes,
    };
    if dry_run {
        return Ok(report);
    }
    write_atomically(config, new_text.as_bytes(), config)?;
    for file in [state_file, backup_path(config)] {
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", file.display())),
        }
    }
    Ok(report)
}

/// The config `text` with dfdaemon installed, the edits made, and notes;
/// an error says why it cannot be done safely.
pub fn plan_install(
    text: &str,
    settings: &Settings,
) -> anyhow::Result<(String, Vec<Change>, Vec<String>)> {
    let mut doc: DocumentMut = text.parse().context("the config is not valid TOML")?;
    let version = Version::of(&doc)?;
    check_proxy_plugins(&doc, settings)?;
    check_registry(&doc, version)?;
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    if doc
        .get("imports")
        .and_then(Item::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        notes.push(
            "the config has `imports`: files it imports can override these settings; check them"
                .to_owned(),
        );
    }

    disable_builtin_content(&mut doc, &mut changes)?;
    for (name, kind, socket) in [
        (CONTENT_PLUGIN, "content", &settings.content_socket),
        (SNAPSHOT_PLUGIN, "snapshot", &settings.snapshot_socket),
    ] {
        let path = ["proxy_plugins", name];
        if get(&doc, &path).is_none() {
            let table = table_at(&mut doc, &path, &mut changes)?;
            table.insert("type", toml_edit::value(kind));
            table.insert("address", toml_edit::value(socket.display().to_string()));
        }
    }
    set_value(
        &mut doc,
        version.snapshotter_table(),
        "snapshotter",
        SNAPSHOT_PLUGIN,
        true,
        &mut changes,
    )?;
    let hosts_dir = settings.hosts_dir.display().to_string();
    let kept = set_value(
        &mut doc,
        version.registry_table(),
        "config_path",
        &hosts_dir,
        false,
        &mut changes,
    )?;
    if let Some(kept) = kept.filter(|k| *k != hosts_dir) {
        notes.push(format!(
            "CRI's registry config_path stays {kept:?}: give dfdaemon the same (--hosts-dir {kept})"
        ));
    }
    Ok((doc.to_string(), changes, notes))
}

/// The config `text` with the recorded `changes` undone, newest first.
pub fn plan_uninstall(text: &str, changes: &[Change]) -> anyhow::Result<String> {
    let mut doc: DocumentMut = text.parse().context("the config is not valid TOML")?;
    for change in changes.iter().rev() {
        match change {
            Change::Value { path, before } => {
                let (key, table) = path.split_last().context("empty key path")?;
                let Some(table) = table_like_mut(&mut doc, table) else {
                    continue;
                };
                match before {
                    Some(before) => {
                        if let Some(item) = table.get_mut(key) {
                            replace_value(item, before);
                        } else {
                            table.insert(key, toml_edit::value(before.as_str()));
                        }
                    }
                    None => {
                        table.remove(key);
                    }
                }
            }
            Change::Disabled { name, created } => {
                if let Some(list) = doc.get_mut("disabled_plugins").and_then(Item::as_array_mut) {
                    list.retain(|v| v.as_str() != Some(name));
                    if *created && list.is_empty() {
                        doc.remove("disabled_plugins");
                    }
                }
            }
            Change::Table { path } => {
                let (key, parent) = path.split_last().context("empty table path")?;
                let strs: Vec<&str> = parent.iter().map(String::as_str).collect();
                let Some(parent) = table_like_mut_strs(&mut doc, &strs) else {
                    continue;
                };
                let empty = parent
                    .get(key)
                    .and_then(Item::as_table_like)
                    .is_some_and(|t| t.is_empty());
                // Our own plugin tables go whatever they hold now.
                let ours =
                    strs == ["proxy_plugins"] && (key == CONTENT_PLUGIN || key == SNAPSHOT_PLUGIN);
                if empty || ours {
                    parent.remove(key);
                }
            }
        }
    }
    Ok(doc.to_string())
}

/// Refuses proxy plugins that clash with dfdaemon's.
fn check_proxy_plugins(doc: &DocumentMut, settings: &Settings) -> anyhow::Result<()> {
    let Some(plugins) = doc.get("proxy_plugins") else {
        return Ok(());
    };
    let plugins = plugins
        .as_table_like()
        .context("`proxy_plugins` is not a table")?;
    for (name, plugin) in plugins.iter() {
        let field = |key: &str| {
            plugin
                .as_table_like()
                .and_then(|t| t.get(key))
                .and_then(Item::as_str)
        };
        let ours = [
            (CONTENT_PLUGIN, "content", &settings.content_socket),
            (SNAPSHOT_PLUGIN, "snapshot", &settings.snapshot_socket),
        ]
        .into_iter()
        .find(|(n, _, _)| *n == name);
        match ours {
            Some((_, kind, socket)) => {
                let address = socket.display().to_string();
                if field("type") != Some(kind) || field("address") != Some(address.as_str()) {
                    bail!(
                        "proxy plugin {name:?} already exists with type {:?} and address {:?}, \
                         not {kind:?} at {address:?}: remove it, or install with its socket",
                        field("type").unwrap_or("none"),
                        field("address").unwrap_or("none")
                    );
                }
            }
            None if field("type") == Some("content") => bail!(
                "proxy plugin {name:?} is already a content store: containerd takes one content \
                 store, so dfdaemon cannot be added next to it"
            ),
            None => {}
        }
    }
    Ok(())
}

/// Refuses CRI registry settings containerd rejects next to `config_path`.
fn check_registry(doc: &DocumentMut, version: Version) -> anyhow::Result<()> {
    let Some(registry) = get(doc, version.registry_table()) else {
        return Ok(());
    };
    let registry = registry
        .as_table_like()
        .context("CRI's `registry` is not a table")?;
    let configured = |key: &str| {
        registry
            .get(key)
            .and_then(Item::as_table_like)
            .is_some_and(|t| !t.is_empty())
    };
    let has_path = registry
        .get("config_path")
        .and_then(Item::as_str)
        .is_some_and(|p| !p.is_empty());
    if configured("mirrors") && !has_path {
        bail!(
            "CRI's registry uses `mirrors`, which containerd refuses next to the `config_path` \
             dfdaemon needs (its fast path reads the same hosts.toml files): move each mirror to \
             <hosts dir>/<registry>/hosts.toml and remove `mirrors`, then install again"
        );
    }
    let tls = registry
        .get("configs")
        .and_then(Item::as_table_like)
        .is_some_and(|configs| {
            configs
                .iter()
                .any(|(_, c)| c.as_table_like().is_some_and(|c| c.get("tls").is_some()))
        });
    if tls && !has_path {
        bail!(
            "CRI's registry has `configs.<host>.tls`, which containerd refuses next to \
             `config_path`: move the TLS settings to hosts.toml files, then install again"
        );
    }
    Ok(())
}

/// Adds the built-in content store to `disabled_plugins`.
fn disable_builtin_content(doc: &mut DocumentMut, changes: &mut Vec<Change>) -> anyhow::Result<()> {
    let created = doc.get("disabled_plugins").is_none();
    if created {
        doc.insert("disabled_plugins", toml_edit::value(Array::new()));
    }
    let list = doc
        .get_mut("disabled_plugins")
        .and_then(Item::as_array_mut)
        .context("`disabled_plugins` is not an array")?;
    if list.iter().any(|v| v.as_str().is_none()) {
        bail!("`disabled_plugins` holds something other than strings");
    }
    if list.iter().all(|v| v.as_str() != Some(BUILTIN_CONTENT)) {
        list.push(BUILTIN_CONTENT);
        changes.push(Change::Disabled {
            name: BUILTIN_CONTENT.to_owned(),
            created,
        });
    }
    Ok(())
}

/// Sets string `key` in the table at `path` to `value`: always if
/// `overwrite`, else only where it is absent or empty. Returns the value
/// kept when it was not overwritten.
fn set_value(
    doc: &mut DocumentMut,
    path: &[&str],
    key: &str,
    value: &str,
    overwrite: bool,
    changes: &mut Vec<Change>,
) -> anyhow::Result<Option<String>> {
    let full: Vec<String> = path.iter().chain([&key]).map(|s| s.to_string()).collect();
    let table = table_at(doc, path, changes)?;
    let before = match table.get(key) {
        Some(item) => Some(
            item.as_str()
                .with_context(|| format!("`{}` is not a string", full.join(".")))?
                .to_owned(),
        ),
        None => None,
    };
    match &before {
        Some(b) if b == value => return Ok(None),
        Some(b) if !overwrite && !b.is_empty() => return Ok(Some(b.clone())),
        _ => {}
    }
    match table.get_mut(key) {
        Some(item) => replace_value(item, value),
        None => {
            table.insert(key, toml_edit::value(value));
        }
    }
    changes.push(Change::Value { path: full, before });
    Ok(None)
}

/// Replaces a string value, keeping its comments and spacing.
fn replace_value(item: &mut Item, value: &str) {
    let decor = item.as_value().map(|v| v.decor().clone());
    let mut new = Value::from(value);
    if let Some(decor) = decor {
        *new.decor_mut() = decor;
    }
    *item = Item::Value(new);
}

/// The table at `path`, creating the missing ones (recorded in `changes`).
fn table_at<'a>(
    doc: &'a mut DocumentMut,
    path: &[&str],
    changes: &mut Vec<Change>,
) -> anyhow::Result<&'a mut dyn toml_edit::TableLike> {
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for (depth, key) in path.iter().enumerate() {
        let here = path[..=depth].join(".");
        if table.get(key).is_none() {
            let mut new = Table::new();
            // Intermediate tables get no header of their own.
            new.set_implicit(depth + 1 < path.len());
            table.insert(key, Item::Table(new));
            changes.push(Change::Table {
                path: path[..=depth].iter().map(|s| s.to_string()).collect(),
            });
        }
        let item = table.get_mut(key).expect("present or just inserted");
        if item.is_inline_table() {
            bail!("`{here}` is an inline table; write it as a [table] and install again");
        }
        table = item
            .as_table_like_mut()
            .with_context(|| format!("`{here}` is not a table"))?;
    }
    Ok(table)
}

fn get<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a Item> {
    let mut item = doc.as_item();
    for key in path {
        item = item.as_table_like()?.get(key)?;
    }
    Some(item)
}

fn table_like_mut<'a>(
    doc: &'a mut DocumentMut,
    path: &[String],
) -> Option<&'a mut dyn toml_edit::TableLike> {
    let strs: Vec<&str> = path.iter().map(String::as_str).collect();
    table_like_mut_strs(doc, &strs)
}

fn table_like_mut_strs<'a>(
    doc: &'a mut DocumentMut,
    path: &[&str],
) -> Option<&'a mut dyn toml_edit::TableLike> {
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for key in path {
        table = table.get_mut(key)?.as_table_like_mut()?;
    }
    Some(table)
}

fn diff(config: &Path, old: &str, new: &str) -> String {
    let name = config.display().to_string();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&name, &name)
        .to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read_state(path: &Path) -> anyhow::Result<Option<State>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("parse the install record {}", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn write_state(path: &Path, state: &State, config: &Path) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state).context("encode the install record")?;
    bytes.push(b'\n');
    write_atomically(path, &bytes, config)
}

/// Writes `bytes` to `path` through a temporary file in the same dir,
/// synced and renamed, with the permissions of `like` (the config).
fn write_atomically(path: &Path, bytes: &[u8], like: &Path) -> anyhow::Result<()> {
    let tmp = sibling(path, "damselfly-tmp");
    let mode = fs::metadata(like)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o644);
    let mut file = fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("sync {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\" # the default\n";

    #[test]
    fn install_then_uninstall_plans_are_inverse() {
        let (installed, changes, _) = plan_install(V2, &Settings::default()).unwrap();
        assert!(installed.contains("# keep me"), "{installed}");
        assert!(
            installed.contains("snapshotter = \"damselfly\" # the default"),
            "{installed}"
        );
        assert!(
            installed.contains("[proxy_plugins.damselfly-content]"),
            "{installed}"
        );
        let (again, more, _) = plan_install(&installed, &Settings::default()).unwrap();
        assert_eq!(again, installed);
        assert!(more.is_empty());
        let back = plan_uninstall(&installed, &changes).unwrap();
        let doc: DocumentMut = back.parse().unwrap();
        assert_eq!(
            doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"].as_str(),
            Some("overlayfs")
        );
        assert!(doc.get("proxy_plugins").is_none(), "{back}");
        assert!(doc.get("disabled_plugins").is_none(), "{back}");
    }

    #[test]
    fn refuses_version_1_and_clashing_plugins() {
        let err = |text: &str| {
            format!(
                "{:#}",
                plan_install(text, &Settings::default()).unwrap_err()
            )
        };
        assert!(err("[plugins.cri]\n").contains("version 1"));
        assert!(err("version = 4\n").contains("not supported"));
        assert!(
            err("version = 2\n[proxy_plugins.other]\ntype = \"content\"\naddress = \"/x\"\n")
                .contains("already a content store")
        );
        assert!(
            err("version = 2\n[proxy_plugins.damselfly]\ntype = \"snapshot\"\naddress = \"/x\"\n")
                .contains("already exists")
        );
    }
}
