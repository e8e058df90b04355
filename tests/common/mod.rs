//! Test harness: real processes (dfdaemon, containerd, docker-registry) in a
//! private scratch directory, stopped and cleaned up on drop, also when a
//! test fails. Every instance gets its own directory, sockets and port, so
//! tests run in parallel without clashing.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod loopback;
pub mod mesh;
pub mod netns;
pub mod oci;
pub mod secure_registry;
pub mod snapshotter_node;
pub mod tree;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use netns::{Host, command_in};
use secure_registry::Secured;

/// `require_root!()` first in a test that needs root: skips it as another
/// user (see [`damselfly::needs_root`]).
#[allow(unused_imports)] // not every test binary has a root-only test
pub use damselfly::require_root;

/// How long a process may take to come up.
const STARTUP: Duration = Duration::from_secs(30);

/// A scratch directory under /tmp (short, for unix socket paths); on drop,
/// unmounts whatever containerd left mounted in it and removes it.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dfly-")
            .tempdir_in("/tmp")
            .expect("create scratch dir");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        unmount_under(self.dir.path());
    }
}

/// Unmounts every mount point below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Panics unless root: what needs it (containerd, netns) checks, so a test
/// that forgot [`require_root!`] fails with this line, not an obscure one.
pub fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "containerd and network namespaces need root: start the test with common::require_root!()"
    );
}

/// A child process killed (SIGKILL) on drop; its output goes to a log file
/// that failing tests print.
pub struct Proc {
    name: String,
    child: std::process::Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Self {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log");
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({command:?}): {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process without warning, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits for it.
    pub fn terminate(&mut self) {
        if self.terminate_within(Duration::from_secs(10)).is_none() {
            self.kill9();
        }
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit: how
    /// it exited, or `None` if it is still running.
    pub fn terminate_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the process's log unless `ready` holds within [`STARTUP`].
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + STARTUP;
        while !ready() {
            if !self.is_running() || Instant::now() > deadline {
                panic!(
                    "{} did not {what}; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn socket_ready(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// dfdaemon serving a data directory on a content socket.
pub struct Dfdaemon {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
    /// The test-net host it runs in (None: the root namespace).
    host: Option<Host>,
    /// Arguments after `--data-dir` and `--content-socket`, on every (re)start.
    pub extra_args: Vec<String>,
    /// Environment variables set on every (re)start (after `RUST_LOG=debug`,
    /// so they may override it).
    pub env: Vec<(String, String)>,
    proc: Option<Proc>,
}

impl Dfdaemon {
    pub fn start(scratch: &Scratch, name: &str) -> Self {
        Self::start_in(scratch, name, None, Vec::new())
    }

    /// Starts dfdaemon inside `host`'s network namespace (if any), with
    /// `extra_args` after the data dir and content socket.
    pub fn start_in(
        scratch: &Scratch,
        name: &str,
        host: Option<&Host>,
        extra_args: Vec<String>,
    ) -> Self {
        Self::start_in_with_env(scratch, name, host, extra_args, Vec::new())
    }

    /// Like [`Dfdaemon::start_in`], with environment variables `env` (for
    /// fault switches, or a `RUST_LOG` of its own).
    pub fn start_in_with_env(
        scratch: &Scratch,
        name: &str,
        host: Option<&Host>,
        extra_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut daemon = Self {
            data_dir: scratch.join(&format!("{name}-data")),
            socket: scratch.join(&format!("{name}.sock")),
            log: scratch.join(&format!("{name}.log")),
            host: host.cloned(),
            extra_args,
            env,
            proc: None,
        };
        daemon.restart();
        daemon
    }

    /// Starts the daemon again (after [`Dfdaemon::kill9`] or [`Dfdaemon::stop`]).
    pub fn restart(&mut self) {
        let netns = self.host.as_ref().map(Host::netns);
        let mut command = command_in(netns, env!("CARGO_BIN_EXE_dfdaemon"));
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--content-socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            .env("RUST_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn("dfdaemon", &mut command, self.log.clone());
        let socket = self.socket.clone();
        proc.wait_until("listen", || socket_ready(&socket));
        self.proc = Some(proc);
    }

    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate();
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("dfdaemon running").pid()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data_dir.join("blobs/sha256").join(hex)
    }

    /// Digests of the committed blobs in the data directory.
    pub fn blobs(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.data_dir.join("blobs/sha256"))
            .map(|dir| {
                dir.map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Bytes of the ingests in progress.
    pub fn ingest_bytes(&self) -> u64 {
        walk_files(&self.data_dir.join("ingest"))
            .iter()
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// Checks that every committed blob hashes to its name.
    pub fn assert_blobs_intact(&self) {
        for digest in self.blobs() {
            assert_eq!(
                sha256_file(&self.blob_path(&digest)),
                digest,
                "blob file does not hash to its name"
            );
        }
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk_files(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// `sha256:<hex>` of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("hash file");
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// `sha256:<hex>` of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A supernode inside a test-net host: its gRPC API on port 8002 of the
/// host's address, metrics on 8003.
pub struct Supernode {
    /// `ip:8002`, what daemons are given as `--supernode`.
    pub addr: String,
    host: Host,
    data_dir: PathBuf,
    log: PathBuf,
    /// Arguments after the address options, on every (re)start.
    pub extra_args: Vec<String>,
    proc: Option<Proc>,
}

impl Supernode {
    /// Starts a supernode named `name` (its data dir and log in the scratch
    /// dir) inside `host`, with `extra_args` (e.g. `--heartbeat-ms`).
    pub fn start_in(scratch: &Scratch, name: &str, host: &Host, extra_args: Vec<String>) -> Self {
        let mut supernode = Self {
            addr: format!("{}:8002", host.ip()),
            host: host.clone(),
            data_dir: scratch.join(&format!("{name}-data")),
            log: scratch.join(&format!("{name}.log")),
            extra_args,
            proc: None,
        };
        supernode.restart();
        supernode
    }

    /// Starts the supernode again (after [`Supernode::kill9`]), with empty
    /// state: daemons must register again.
    pub fn restart(&mut self) {
        let ip = self.host.ip();
        let mut command = self.host.command(env!("CARGO_BIN_EXE_supernode"));
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.addr)
            .arg("--advertise-ip")
            .arg(ip.to_string())
            .arg("--metrics-listen")
            .arg(format!("{ip}:8003"))
            .args(&self.extra_args)
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("supernode", &mut command, self.log.clone());
        let addr = self.addr.clone();
        proc.wait_until("listen", || std::net::TcpStream::connect(&addr).is_ok());
        self.proc = Some(proc);
    }

    /// Kills the supernode without warning.
    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A private docker-registry on a loopback port, or on port 5000 of a
/// test-net host; plain HTTP and anonymous, or (secure) HTTPS with a login.
pub struct Registry {
    /// `ip:port` it listens on.
    pub host: String,
    /// Its CA and login, if it is secure.
    pub secured: Option<Secured>,
    _proc: Proc,
}

impl Registry {
    pub fn start(scratch: &Scratch) -> Self {
        Self::start_in(scratch, None)
    }

    /// Starts the registry inside `net_host`'s network namespace, listening
    /// on the host's address, port 5000; without one, on a free loopback port.
    pub fn start_in(scratch: &Scratch, net_host: Option<&Host>) -> Self {
        Self::launch(scratch, net_host, None)
    }

    /// Starts a registry on a free loopback port that serves HTTPS with a
    /// certificate for 127.0.0.1 from a CA of its own, and answers only
    /// requests with its login (htpasswd, Basic).
    pub fn start_secure(scratch: &Scratch) -> Self {
        let dir = scratch.join("registry-tls");
        Self::launch(scratch, None, Some(Secured::create(&dir)))
    }

    fn launch(scratch: &Scratch, net_host: Option<&Host>, secured: Option<Secured>) -> Self {
        let host = match net_host {
            Some(h) => format!("{}:5000", h.ip()),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let storage = scratch.join("registry");
        fs::create_dir_all(&storage).unwrap();
        let config = scratch.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{}",
                storage.display(),
                secured.as_ref().map(Secured::registry_config).unwrap_or_default()
            ),
        )
        .unwrap();
        let mut proc = Proc::spawn(
            "docker-registry",
            command_in(net_host.map(Host::netns), "docker-registry")
                .arg("serve")
                .arg(&config),
            scratch.join("registry.log"),
        );
        proc.wait_until("listen", || std::net::TcpStream::connect(&host).is_ok());
        Self {
            host,
            secured,
            _proc: proc,
        }
    }

    /// How containerd reaches this registry.
    pub fn upstream(&self) -> Upstream<'_> {
        Upstream {
            host: &self.host,
            ca: self.secured.as_ref().map(|s| s.ca.as_path()),
        }
    }

    /// Pushes a test image set (see test-images/) and returns its catalog.
    pub fn push(&self, set: &str) -> Catalog {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-images/push.sh");
        let mut command = Command::new(&script);
        if let Some(secured) = &self.secured {
            command
                .arg("--cert-dir")
                .arg(secured.ca_dir())
                .arg("--creds")
                .arg(secured.creds());
        }
        let out = command
            .arg(&self.host)
            .arg(set)
            .output()
            .expect("run test-images/push.sh");
        assert!(
            out.status.success(),
            "push.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = stdout
            .lines()
            .find_map(|l| l.strip_prefix("catalog: "))
            .expect("push.sh names its catalog");
        serde_json::from_slice(&fs::read(path.trim()).expect("read catalog"))
            .expect("parse catalog")
    }
}

/// How containerd (and dfdaemon's registry client) reach a registry: its
/// `host:port`, over HTTPS trusting `ca` if there is one, else plain HTTP.
#[derive(Clone, Copy)]
pub struct Upstream<'a> {
    pub host: &'a str,
    pub ca: Option<&'a Path>,
}

impl<'a> From<&'a str> for Upstream<'a> {
    /// A plain-HTTP registry.
    fn from(host: &'a str) -> Self {
        Self { host, ca: None }
    }
}

impl<'a> From<&'a String> for Upstream<'a> {
    fn from(host: &'a String) -> Self {
        Self::from(host.as_str())
    }
}

impl Upstream<'_> {
    /// Writes `<hosts_dir>/<host>/hosts.toml`, containerd's configuration
    /// of this registry (pull and resolve, its CA if any).
    pub fn write_hosts_toml(&self, hosts_dir: &Path) {
        let (scheme, ca) = match self.ca {
            Some(ca) => ("https", format!("ca = \"{}\"\n", ca.display())),
            None => ("http", String::new()),
        };
        let url = format!("{scheme}://{}", self.host);
        let dir = hosts_dir.join(self.host);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("hosts.toml"),
            format!("server = \"{url}\"\n{ca}[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  {ca}"),
        )
        .unwrap();
    }
}

/// What test-images/ generated: images and their blobs.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Catalog(pub Vec<CatalogImage>);

#[derive(Debug, Deserialize)]
pub struct CatalogImage {
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
    pub blobs: Vec<CatalogBlob>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct CatalogBlob {
    pub digest: String,
    pub size: u64,
    pub kind: String,
    #[serde(default)]
    pub platform: Option<String>,
    /// A layer's diff_id (digest of its uncompressed tar).
    #[serde(default)]
    pub diff_id: Option<String>,
}

impl Catalog {
    pub fn image(&self, reference: &str) -> &CatalogImage {
        self.0
            .iter()
            .find(|i| i.reference == reference)
            .unwrap_or_else(|| panic!("no image {reference} in the catalog"))
    }
}

impl CatalogImage {
    /// The blobs a pull for linux/amd64 fetches: the index, if any, and
    /// everything of the amd64 platform.
    pub fn amd64_blobs(&self) -> Vec<CatalogBlob> {
        self.blobs
            .iter()
            .filter(|b| b.platform.as_deref().is_none_or(|p| p == "linux/amd64"))
            .cloned()
            .collect()
    }
}

/// A private containerd whose content store is a dfdaemon.
pub struct Containerd {
    pub socket: PathBuf,
    pub root: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// The test-net host it (and `ctr`) runs in (None: the root namespace).
    host: Option<Host>,
    proc: Option<Proc>,
}

impl Containerd {
    /// Starts containerd with dfdaemon's `plugin_socket` as its content
    /// store; `registry` is reachable over plain HTTP (also for CRI pulls).
    pub fn start(scratch: &Scratch, name: &str, plugin_socket: &Path, registry: &str) -> Self {
        Self::start_in(scratch, name, None, plugin_socket, registry)
    }

    /// Like [`Containerd::start`], inside `host`'s network namespace (if
    /// any). [`Containerd::ctr`] then runs there too: `ctr image pull`
    /// fetches from the registry in the ctr process itself. Mounts containerd
    /// makes (unpacking) stay in its private mount namespace (see
    /// [`Host::command`]).
    pub fn start_in(
        scratch: &Scratch,
        name: &str,
        host: Option<&Host>,
        plugin_socket: &Path,
        registry: &str,
    ) -> Self {
        Self::start_with(scratch, name, host, Some(plugin_socket), None, registry)
    }

    /// Where [`Containerd::start_with`] puts the API socket and the hosts
    /// directory of containerd `name`, known before it starts (dfdaemon's
    /// fast path is told them).
    pub fn paths(scratch: &Scratch, name: &str) -> (PathBuf, PathBuf) {
        let dir = scratch.join(name);
        (dir.join("c.sock"), dir.join("certs.d"))
    }

    /// Like [`Containerd::start_in`]; with `snapshot_socket`, dfdaemon is
    /// also its snapshotter, named `damselfly`, and CRI's default one;
    /// `registry` may be a secure one ([`Registry::upstream`]). Without
    /// `plugin_socket` (and `snapshot_socket`) it is a stock containerd: its
    /// own content store and overlayfs snapshotter.
    pub fn start_with<'a>(
        scratch: &Scratch,
        name: &str,
        host: Option<&Host>,
        plugin_socket: Option<&Path>,
        snapshot_socket: Option<&Path>,
        registry: impl Into<Upstream<'a>>,
    ) -> Self {
        assert_root();
        let dir = scratch.join(name);
        let certs = dir.join("certs.d");
        registry.into().write_hosts_toml(&certs);
        let socket = dir.join("c.sock");
        let root = dir.join("root");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
{disabled_content}
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[proxy_plugins]
{content_plugin}
{snapshot_plugin}
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
{cri_snapshotter}
"#,
                root = root.display(),
                state = dir.join("state").display(),
                socket = socket.display(),
                disabled_content = if plugin_socket.is_some() {
                    r#"disabled_plugins = ["io.containerd.content.v1.content"]"#
                } else {
                    ""
                },
                content_plugin = plugin_socket
                    .map(|s| format!("  [proxy_plugins.damselfly-content]\n    type = \"content\"\n    address = \"{}\"", s.display()))
                    .unwrap_or_default(),
                certs = certs.display(),
                snapshot_plugin = snapshot_socket
                    .map(|s| format!("  [proxy_plugins.damselfly]\n    type = \"snapshot\"\n    address = \"{}\"", s.display()))
                    .unwrap_or_default(),
                cri_snapshotter = if snapshot_socket.is_some() {
                    "  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"damselfly\""
                } else {
                    ""
                },
            ),
        )
        .unwrap();
        let mut containerd = Self {
            socket,
            root,
            config,
            log: scratch.join(&format!("{name}.log")),
            host: host.cloned(),
            proc: None,
        };
        containerd.restart();
        containerd
    }

    pub fn restart(&mut self) {
        let netns = self.host.as_ref().map(Host::netns);
        let mut proc = Proc::spawn(
            "containerd",
            command_in(netns, "containerd")
                .arg("--config")
                .arg(&self.config),
            self.log.clone(),
        );
        let socket = self.socket.clone();
        proc.wait_until("serve", || {
            socket_ready(&socket)
                && Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
        self.proc = Some(proc);
    }

    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate();
        }
    }

    /// Waits until containerd reaches its content plugin again: after the
    /// plugin restarts, containerd's gRPC client reconnects with a backoff of
    /// up to 3 s, and calls fail with Unavailable meanwhile.
    /// Waits until containerd reaches dfdaemon again after a restart of
    /// either (its client reconnects with a backoff of a few seconds).
    /// `content ls` alone answers from containerd's own metadata, so a blob
    /// it lists is read back too: only that goes to dfdaemon.
    pub fn wait_for_plugin(&self) {
        wait_for("containerd to reconnect to dfdaemon", STARTUP, || {
            let listed = self.ctr(&["content", "ls", "-q"]);
            let text = String::from_utf8_lossy(&listed.stdout);
            listed.status.success()
                && text
                    .split_whitespace()
                    .next()
                    .is_none_or(|digest| self.ctr(&["content", "get", digest]).status.success())
        });
    }

    /// Runs `ctr` against this containerd in namespace `test`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in("test", args)
    }

    /// Runs `ctr` against this containerd in `namespace` (CRI's is `k8s.io`).
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
        command_in(self.host.as_ref().map(Host::netns), "ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// Like [`Containerd::ctr`], panicking (with containerd's log) on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> Vec<u8> {
        self.ctr_in_ok("test", args)
    }

    /// Like [`Containerd::ctr_in`], panicking (with containerd's log) on failure.
    pub fn ctr_in_ok(&self, namespace: &str, args: &[&str]) -> Vec<u8> {
        let out = self.ctr_in(namespace, args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\ncontainerd log tail:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log, 30)
        );
        out.stdout
    }

    /// Pulls (and unpacks) an image from the registry over plain HTTP.
    pub fn pull(&self, registry: &str, image: &str) {
        let reference = format!("{registry}/{image}");
        self.ctr_ok(&["image", "pull", "--plain-http", &reference]);
    }

    /// A kubelet-style pull of `reference` (see [`try_cri_pull`]).
    pub async fn try_cri_pull(
        &self,
        reference: &str,
        login: Option<(&str, &str)>,
    ) -> Result<(), tonic::Status> {
        try_cri_pull(&self.socket, reference, login).await
    }

    /// Like [`Containerd::try_cri_pull`] without a login, panicking (with
    /// containerd's log) on failure.
    pub async fn cri_pull(&self, reference: &str) {
        self.try_cri_pull(reference, None)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CRI PullImage {reference}: {e}\ncontainerd log tail:\n{}",
                    tail(&self.log, 30)
                )
            });
    }

    /// Reads a blob back through containerd.
    pub fn content(&self, digest: &str) -> Vec<u8> {
        self.ctr_ok(&["content", "get", digest])
    }

    /// Checks that `ctr image check` in `namespace` finds every one of the
    /// `blobs` of image `reference`.
    pub fn assert_image_complete(&self, namespace: &str, reference: &str, blobs: usize) {
        let check =
            String::from_utf8_lossy(&self.ctr_in_ok(namespace, &["image", "check"])).into_owned();
        let line = check
            .lines()
            .find(|l| l.starts_with(reference))
            .unwrap_or_else(|| panic!("{reference} is not listed:\n{check}"));
        assert!(
            line.contains(&format!("complete ({blobs}/{blobs})")),
            "{check}"
        );
    }

    /// Runs a container of image `reference` in `namespace` on
    /// `snapshotter` (with runc, busybox bound in) and checks that it reads
    /// each of `files` with its size.
    pub fn assert_container_reads(
        &self,
        namespace: &str,
        snapshotter: &str,
        reference: &str,
        files: &[(&str, u64)],
    ) {
        let mut run = vec![
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            "--mount",
            "type=bind,src=/bin/busybox,dst=/bin/busybox,options=rbind:ro",
            reference,
            "damselfly-probe",
            "/bin/busybox",
            "wc",
            "-c",
        ];
        run.extend(files.iter().map(|(path, _)| *path));
        let counted = String::from_utf8_lossy(&self.ctr_in_ok(namespace, &run)).into_owned();
        for (path, size) in files {
            assert!(
                counted
                    .lines()
                    .any(|l| l.split_whitespace().eq([size.to_string().as_str(), path])),
                "the container reads {path} ({size} bytes): {counted}"
            );
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(file) = fs::File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One node: a dfdaemon and the containerd that uses it (stopped first).
pub struct Node {
    pub containerd: Containerd,
    pub dfdaemon: Dfdaemon,
}

impl Node {
    pub fn start(scratch: &Scratch, registry: &Registry) -> Self {
        let dfdaemon = Dfdaemon::start(scratch, "dfdaemon");
        let containerd = Containerd::start(scratch, "containerd", &dfdaemon.socket, &registry.host);
        Self {
            dfdaemon,
            containerd,
        }
    }

    /// A node inside test-net `host`: its dfdaemon (with `dfdaemon_args`) and
    /// containerd run in the host's namespace, named `<host>-dfdaemon` and
    /// `<host>-containerd` in the scratch dir (so several share one).
    pub fn start_in(
        scratch: &Scratch,
        host: &Host,
        registry: &Registry,
        dfdaemon_args: Vec<String>,
    ) -> Self {
        Self::start_in_with_env(scratch, host, registry, dfdaemon_args, Vec::new())
    }

    /// Like [`Node::start_in`], with environment `env` for dfdaemon.
    pub fn start_in_with_env(
        scratch: &Scratch,
        host: &Host,
        registry: &Registry,
        dfdaemon_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Self {
        Self::start_with(
            scratch,
            host,
            registry,
            dfdaemon_args,
            env,
            Plugins::Content,
        )
    }

    /// Like [`Node::start_in_with_env`], dfdaemon serving containerd
    /// `plugins`. As its snapshotter too, it is told containerd's socket and
    /// hosts dir (for the fast path), and its snapshot socket is
    /// `<host>-snapshot.sock`.
    pub fn start_with(
        scratch: &Scratch,
        host: &Host,
        registry: &Registry,
        mut dfdaemon_args: Vec<String>,
        env: Vec<(String, String)>,
        plugins: Plugins,
    ) -> Self {
        let name = host.name();
        let containerd_name = format!("{name}-containerd");
        let snapshot_socket = (plugins == Plugins::ContentAndSnapshots)
            .then(|| scratch.join(&format!("{name}-snapshot.sock")));
        if let Some(socket) = &snapshot_socket {
            dfdaemon_args.extend(snapshotter_args(scratch, &containerd_name, socket));
        }
        let dfdaemon = Dfdaemon::start_in_with_env(
            scratch,
            &format!("{name}-dfdaemon"),
            Some(host),
            dfdaemon_args,
            env,
        );
        let containerd = Containerd::start_with(
            scratch,
            &containerd_name,
            Some(host),
            Some(&dfdaemon.socket),
            snapshot_socket.as_deref(),
            &registry.host,
        );
        Self {
            dfdaemon,
            containerd,
        }
    }
}

/// A kubelet-style pull of `reference` from the containerd at `socket`:
/// CRI `ImageService/PullImage`, with a login if given (as kubelet sends an
/// imagePullSecret).
pub async fn try_cri_pull(
    socket: &Path,
    reference: &str,
    login: Option<(&str, &str)>,
) -> Result<(), tonic::Status> {
    let channel = containerd_client::connect(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect to containerd: {e}")))?;
    let auth = login.map(|(username, password)| AuthConfig {
        username: username.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    });
    ImageServiceClient::new(channel)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.to_owned(),
                ..Default::default()
            }),
            auth,
            ..Default::default()
        })
        .await
        .map(drop)
}

/// dfdaemon's arguments to serve `snapshot_socket` with the fast path on,
/// for containerd `containerd_name` (its socket and hosts dir, as
/// [`Containerd::paths`] says).
pub fn snapshotter_args(
    scratch: &Scratch,
    containerd_name: &str,
    snapshot_socket: &Path,
) -> Vec<String> {
    let (containerd_socket, hosts_dir) = Containerd::paths(scratch, containerd_name);
    [
        ("--snapshot-socket", snapshot_socket),
        ("--containerd-socket", &containerd_socket),
        ("--hosts-dir", &hosts_dir),
    ]
    .into_iter()
    .flat_map(|(option, path)| [option.to_owned(), path.display().to_string()])
    .collect()
}

/// The text of a Prometheus `/metrics` page on `addr` (`ip:port`).
pub async fn scrape(addr: &str) -> String {
    damselfly::registry::install_crypto_provider();
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("scrape {addr}: {e}"))
        .text()
        .await
        .expect("read metrics")
}

/// The proxy plugins a node's dfdaemon serves its containerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugins {
    /// The content store only; containerd's own overlayfs snapshotter.
    Content,
    /// The content store and the snapshotter `damselfly` (CRI's default).
    ContentAndSnapshots,
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10));
    }
}

/// The supernode (of `addrs`) that owns `digest`'s task: the highest
/// sha256(digest, 0, address), as src/mesh/supernode_client.rs orders them.
pub fn rendezvous_owner<'a>(digest: &str, addrs: &'a [String]) -> &'a str {
    use sha2::{Digest as _, Sha256};
    addrs
        .iter()
        .max_by_key(|addr| {
            Sha256::new()
                .chain_update(digest)
                .chain_update([0])
                .chain_update(addr.as_bytes())
                .finalize()
        })
        .expect("a supernode")
}
