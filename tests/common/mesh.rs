//! The mesh test bed the multi-node tests share: a test net with the
//! registry and the supernodes in hosts of their own, nodes (containerd and
//! dfdaemon) meshed through those supernodes, their metrics, and their logs
//! printed (or kept) when a test fails.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use super::netns::{Host, TestNet};
use super::{CatalogBlob, CatalogImage, Containerd, Node, Plugins, Registry, Scratch, Supernode};

/// The image the mesh tests pull: 3 uncompressed layers of 128, 96 and
/// 32 MiB (test-images set `bench256`).
pub const BENCH256: &str = "damselfly/bench256:v1";
/// Heartbeats told to daemons: a dead host is dropped after 3 missed ones
/// (1.5 to 2 s), well inside a downloader's stall timeout.
pub const HEARTBEAT_MS: &str = "500";
/// `ctr --timeout` of every pull: far above any pull here, so only a hang
/// reaches it.
pub const PULL_TIMEOUT: &str = "180s";
/// dfdaemon's own log level: per-piece upload lines, no HTTP/2 chatter.
pub const DFDAEMON_LOG: &str = "info,damselfly=debug";

/// On drop, when the test failed, prints the end of each dfdaemon's and
/// supernode's log; with `DFLY_KEEP_LOGS=<dir>`, also copies every log to
/// `<dir>/<test>/` (the scratch dir goes away with the test).
pub struct KeepLogs {
    dir: PathBuf,
    test: &'static str,
}

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        if thread::panicking() {
            for log in logs.iter().filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.contains("dfdaemon") || name.contains("supernode") || name.starts_with("sn")
            }) {
                eprintln!(
                    "==== {} (last lines)\n{}",
                    log.display(),
                    super::tail(log, 25)
                );
            }
        }
        if let Some(keep) = std::env::var_os("DFLY_KEEP_LOGS") {
            let dir = std::path::Path::new(&keep).join(self.test);
            let _ = fs::remove_dir_all(&dir);
            let _ = fs::create_dir_all(&dir);
            for log in &logs {
                let _ = fs::copy(log, dir.join(log.file_name().unwrap()));
            }
            eprintln!("logs kept in {}", dir.display());
        }
    }
}

/// What every mesh test starts with: a scratch dir, its logs watched (see
/// [`KeepLogs`]), a test net of `hosts` and a registry on its "registry"
/// host. Bound in this order, they go away in the reverse one.
pub fn testbed(test: &'static str, hosts: &[&str]) -> (Scratch, KeepLogs, TestNet, Registry) {
    let scratch = Scratch::new();
    let logs = KeepLogs {
        dir: scratch.path().to_owned(),
        test,
    };
    let net = TestNet::new(hosts);
    let registry = Registry::start_in(&scratch, Some(net.host("registry")));
    (scratch, logs, net, registry)
}

/// The registry and supernode hosts, then `nodes`.
pub fn with_infra<'a>(nodes: &[&'a str]) -> Vec<&'a str> {
    let mut hosts = vec!["registry", "supernode"];
    hosts.extend_from_slice(nodes);
    hosts
}

/// A supernode without a repo: the tests of the daemons' mesh count every
/// piece as coming from a peer or the registry.
pub fn start_supernode(scratch: &Scratch, net: &TestNet, name: &str) -> Supernode {
    start_supernode_with(scratch, net, name, &["--repo-max-mib", "0"])
}

pub fn start_supernode_with(
    scratch: &Scratch,
    net: &TestNet,
    name: &str,
    args: &[&str],
) -> Supernode {
    let mut all = vec!["--heartbeat-ms".to_owned(), HEARTBEAT_MS.to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    Supernode::start_in(scratch, name, net.host(name), all)
}

/// A node in `host` whose dfdaemon uses `supernodes` (addresses, in the
/// `nodes:` order of its config file), with environment `env`.
pub fn start_node(
    scratch: &Scratch,
    host: &Host,
    registry: &Registry,
    supernodes: &[&str],
    env: &[(&str, &str)],
) -> Node {
    start_node_with(scratch, host, registry, supernodes, env, Plugins::Content)
}

/// Like [`start_node`], its dfdaemon serving containerd `plugins`.
pub fn start_node_with(
    scratch: &Scratch,
    host: &Host,
    registry: &Registry,
    supernodes: &[&str],
    env: &[(&str, &str)],
    plugins: Plugins,
) -> Node {
    let name = host.name();
    let config = scratch.join(&format!("{name}-dfget.yml"));
    let nodes: Vec<String> = supernodes.iter().map(|s| format!("{s:?}")).collect();
    fs::write(
        &config,
        format!(
            "nodes: [{}]\nadvertise_ip: {}\nupload_port: 65002\n",
            nodes.join(", "),
            host.ip()
        ),
    )
    .unwrap();
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert(0, ("RUST_LOG".into(), DFDAEMON_LOG.into()));
    let args = vec!["--config".into(), config.display().to_string()];
    Node::start_with(scratch, host, registry, args, env, plugins)
}

/// Nodes in the hosts `names`, meshed through `supernodes`.
pub fn start_nodes(
    scratch: &Scratch,
    net: &TestNet,
    registry: &Registry,
    names: &[&str],
    supernodes: &[&Supernode],
) -> Vec<Node> {
    start_nodes_with(scratch, net, registry, names, supernodes, Plugins::Content)
}

/// Like [`start_nodes`], their dfdaemons serving containerd `plugins`.
pub fn start_nodes_with(
    scratch: &Scratch,
    net: &TestNet,
    registry: &Registry,
    names: &[&str],
    supernodes: &[&Supernode],
    plugins: Plugins,
) -> Vec<Node> {
    let addrs: Vec<&str> = supernodes.iter().map(|s| s.addr.as_str()).collect();
    names
        .iter()
        .map(|name| start_node_with(scratch, net.host(name), registry, &addrs, &[], plugins))
        .collect()
}

/// `/metrics` of the server at `addr`, fetched from inside `host`.
pub fn scrape(host: &Host, addr: &str) -> String {
    let out = host
        .command("curl")
        .args(["-fsS", &format!("http://{addr}/metrics")])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "scrape {addr}: {out:?}");
    String::from_utf8(out.stdout).expect("metrics are text")
}

/// The value of the sample named exactly `sample` (with its labels; the
/// `damselfly_` namespace left out).
pub fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .map(|l| l.strip_prefix("damselfly_").unwrap_or(l))
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {sample} in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sample}: {e}"))
}

/// The value of `key=value` in a log line, without quotes.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

/// Log lines with `message` that name `digest`.
pub fn lines_with<'a>(log: &'a str, message: &str, digest: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(message) && l.contains(digest))
        .collect()
}

/// Bytes of the image's layers, and of its other blobs (manifest, config).
pub fn image_bytes(image: &CatalogImage) -> (u64, u64) {
    let blobs = image.amd64_blobs();
    let layers = blobs
        .iter()
        .filter(|b| b.kind == "layer")
        .map(|b| b.size)
        .sum();
    let small = blobs
        .iter()
        .filter(|b| b.kind != "layer")
        .map(|b| b.size)
        .sum();
    (layers, small)
}

/// The image's layers, largest first.
pub fn layer_blobs(image: &CatalogImage) -> Vec<CatalogBlob> {
    let mut layers: Vec<CatalogBlob> = image
        .amd64_blobs()
        .into_iter()
        .filter(|b| b.kind == "layer")
        .collect();
    layers.sort_by_key(|b| std::cmp::Reverse(b.size));
    layers
}

/// `ctr image pull --plain-http reference`: its time, or its stderr.
pub fn pull(containerd: &Containerd, reference: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let out = containerd.ctr(&[
        "--timeout",
        PULL_TIMEOUT,
        "image",
        "pull",
        "--plain-http",
        reference,
    ]);
    if out.status.success() {
        Ok(start.elapsed())
    } else {
        Err(format!(
            "ctr image pull {reference} failed after {:.1} s: {}",
            start.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
