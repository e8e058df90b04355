//! A test bed of several "hosts" on one machine: every host is a network
//! namespace with its own `eth0` on a private test subnet, all joined by one
//! Linux bridge, each link optionally shaped with `tc`.
//!
//! Layout of one [`TestNet`] with id `<pid>.<n>` (`n` counts the test nets of
//! this process in base 36):
//!
//! ```text
//!  root namespace           namespace dfly-<id> ("switch")
//!  dfu<id> ──────── veth ──── uplink ─┐
//!  10.a.b.254/24                      br0 ── h1 ── veth ── eth0 10.a.b.1  namespace dfly-<id>-<host1>
//!                                         ── h2 ── veth ── eth0 10.a.b.2  namespace dfly-<id>-<host2>
//! ```
//!
//! The bridge lives in a namespace of its own rather than in the root
//! namespace: a fresh namespace has no iptables/nftables rules, so bridged
//! traffic between hosts is never dropped by the machine's firewall through
//! `br_netfilter` (`bridge-nf-call-iptables` is per namespace, and is also
//! switched off in the switch namespace), and no global setting is touched.
//! The root namespace (the test process, `skopeo`, `curl`) reaches every host
//! through the uplink veth `dfu<id>`, which holds `.254`.
//!
//! Only the namespaces and `dfu<id>` are visible machine-wide, and all of them
//! carry the id, so tests in parallel (threads or processes) never clash. The
//! subnet `10.a.b.0/24` is taken from 10.200.0.0–10.254.255.0 and never
//! overlaps a route of the root namespace (in any table); it is chosen under a
//! lock file and held by the uplink's route, so concurrent test nets pick
//! different subnets.
//!
//! Drop kills whatever still runs inside the namespaces and deletes them (the
//! veths and the bridge go with them). Processes started in a host should
//! still be owned by handles ([`super::Proc`], [`super::Node`], ...) declared
//! *after* the `TestNet`, so that they are dropped (killed) first; if one is
//! not, the `TestNet` kills it with SIGKILL. [`cleanup_stale`] (run by
//! [`TestNet::new`]) removes what a crashed test run left behind.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Prefix of every namespace a test net creates.
const NS_PREFIX: &str = "dfly-";
/// Prefix of the uplink veth in the root namespace.
const UPLINK_PREFIX: &str = "dfu";
/// The bridge, inside the switch namespace.
const BRIDGE: &str = "br0";
/// The switch-side end of the uplink veth.
const UPLINK_PORT: &str = "uplink";
/// Each host's interface, inside its namespace.
const HOST_IF: &str = "eth0";
/// The last octet of the root namespace's address on every test subnet.
const ROOT_OCTET: u8 = 254;
/// Subnets are `10.a.b.0/24` with `a` in this range (and any `b`).
const SUBNET_A: std::ops::RangeInclusive<u8> = 200..=254;
/// Serialises subnet choice between processes (held until the uplink's
/// address, and so its route, exists).
const SUBNET_LOCK: &str = "/run/dfly-testnet.lock";
/// Maximum length of a network interface name (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;
/// How long to wait for SIGKILLed processes to leave a namespace.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Numbers the test nets of this process.
static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// A bridge and one network namespace per host, removed on drop.
pub struct TestNet {
    id: String,
    subnet: Ipv4Addr,
    switch_ns: String,
    uplink: String,
    /// Namespaces created so far (the switch first), for drop.
    namespaces: Vec<String>,
    /// Whether the uplink device exists yet, for drop.
    uplink_created: bool,
    hosts: Vec<Host>,
}

/// One host of a [`TestNet`]: a network namespace with `eth0` on the test
/// subnet. Cheap to clone; valid while its `TestNet` lives.
#[derive(Clone, Debug)]
pub struct Host {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    switch_ns: String,
    /// The bridge-side end of this host's veth (in the switch namespace).
    port: String,
}

impl TestNet {
    /// Creates the switch namespace with its bridge, the uplink from the root
    /// namespace, and one namespace per name in `hosts` (addresses `.1`,
    /// `.2`, ... in order). Removes stale namespaces of crashed runs first.
    /// Panics, naming the failed command and its stderr, if a step fails
    /// (whatever was created by then is removed).
    pub fn new(hosts: &[&str]) -> Self {
        super::assert_root();
        check_host_names(hosts);
        cleanup_stale();
        let id = next_id();
        let mut net = Self {
            switch_ns: format!("{NS_PREFIX}{id}"),
            uplink: format!("{UPLINK_PREFIX}{id}"),
            id,
            subnet: Ipv4Addr::UNSPECIFIED,
            namespaces: Vec::new(),
            uplink_created: false,
            hosts: Vec::new(),
        };
        assert!(net.uplink.len() <= IFNAME_MAX, "{} is too long", net.uplink);
        net.create_switch();
        net.create_uplink();
        for (index, name) in hosts.iter().enumerate() {
            net.add_host(index as u8 + 1, name);
        }
        net
    }

    /// The id in every name this test net owns (`<pid>.<n>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host called `name`; panics if there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in test net {}", self.id))
    }

    /// All hosts, in the order given to [`TestNet::new`].
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The test subnet, as `10.a.b.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/24", self.subnet)
    }

    /// The root namespace's address on the test subnet (hosts reach services
    /// of the test process there).
    pub fn root_ip(&self) -> Ipv4Addr {
        self.address(ROOT_OCTET)
    }

    /// The uplink device in the root namespace.
    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// Every namespace this test net owns: the switch and the hosts.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// `10.a.b.<last>` on this net's subnet.
    fn address(&self, last: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.octets();
        Ipv4Addr::new(a, b, c, last)
    }

    /// Creates a namespace, remembers it for drop, and turns IPv6 off in it
    /// (no autoconfiguration chatter in the byte counters).
    fn add_namespace(&mut self, netns: &str) {
        ip(&format!("netns add {netns}"));
        self.namespaces.push(netns.to_owned());
        let ipv6 = "/proc/sys/net/ipv6/conf/{all,default}/disable_ipv6";
        set_proc_sys(netns, ipv6, 1);
    }

    /// The switch namespace and its bridge; bridge netfilter off in it.
    fn create_switch(&mut self) {
        let switch = self.switch_ns.clone();
        self.add_namespace(&switch);
        set_proc_sys(&switch, "/proc/sys/net/bridge/bridge-nf-call-*", 0);
        ip(&format!("-n {switch} link add name {BRIDGE} type bridge"));
        ip(&format!("-n {switch} link set dev {BRIDGE} up"));
    }

    /// Picks the subnet and connects the root namespace to the bridge with
    /// `.254`, under [`SUBNET_LOCK`] so that parallel runs see each other's
    /// routes.
    fn create_uplink(&mut self) {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(SUBNET_LOCK)
            .unwrap_or_else(|e| panic!("open {SUBNET_LOCK}: {e}"));
        lock.lock()
            .unwrap_or_else(|e| panic!("lock {SUBNET_LOCK}: {e}"));
        self.subnet = pick_subnet(&self.id, &root_routes());
        let (uplink, switch) = (self.uplink.clone(), self.switch_ns.clone());
        ip(&format!(
            "link add name {uplink} type veth peer name {UPLINK_PORT} netns {switch}"
        ));
        self.uplink_created = true;
        // Best effort: without IPv6 in the kernel there is nothing to turn off.
        let _ = fs::write(
            format!("/proc/sys/net/ipv6/conf/{uplink}/disable_ipv6"),
            "1",
        );
        ip(&format!(
            "-n {switch} link set dev {UPLINK_PORT} master {BRIDGE} up"
        ));
        ip(&format!("addr add {}/24 dev {uplink}", self.root_ip()));
        ip(&format!("link set dev {uplink} up"));
        drop(lock);
    }

    /// Creates host `name` with address `.index`: its namespace, `lo` up, and
    /// a veth from its `eth0` to the bridge port `h<index>`.
    fn add_host(&mut self, index: u8, name: &str) {
        let host = Host {
            name: name.to_owned(),
            netns: format!("{NS_PREFIX}{}-{name}", self.id),
            ip: self.address(index),
            switch_ns: self.switch_ns.clone(),
            port: format!("h{index}"),
        };
        let (ns, switch, port) = (&host.netns, &host.switch_ns, &host.port);
        self.add_namespace(ns);
        ip(&format!(
            "link add name {HOST_IF} netns {ns} type veth peer name {port} netns {switch}"
        ));
        ip(&format!(
            "-n {switch} link set dev {port} master {BRIDGE} up"
        ));
        ip(&format!("-n {ns} addr add {}/24 dev {HOST_IF}", host.ip));
        ip(&format!("-n {ns} link set dev {HOST_IF} up"));
        ip(&format!("-n {ns} link set dev lo up"));
        self.hosts.push(host);
    }
}

impl Drop for TestNet {
    /// Kills every process still inside the namespaces, deletes the uplink
    /// (synchronously, so that it is gone when drop returns), then the
    /// namespaces. Reports failures on stderr; never panics.
    fn drop(&mut self) {
        for netns in &self.namespaces {
            kill_all_in(netns);
        }
        if self.uplink_created
            && let Err(e) = try_ip(&format!("link del dev {}", self.uplink))
        {
            eprintln!("test net {}: {e}", self.id);
        }
        for netns in self.namespaces.iter().rev() {
            if let Err(e) = try_ip(&format!("netns del {netns}")) {
                eprintln!("test net {}: {e}", self.id);
            }
        }
    }
}

impl Host {
    /// The name given to [`TestNet::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This host's address on the test subnet.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The network namespace's name (as in `ip netns list`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A command running `program` inside this host's namespace. `ip netns
    /// exec` execs the program, so the child's pid is the program's own. It
    /// also gives the program a mount namespace of its own (a slave of the
    /// root one, with the host's `/sys`): the program sees every file, but
    /// mounts it makes are invisible outside and vanish when it exits.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(Some(&self.netns), program)
    }

    /// Limits this host's link to `mbit` Mbit/s in each direction with a
    /// token bucket (`tbf`): upload on the egress of the host's `eth0`,
    /// download on the egress of its bridge port. Replaces an earlier shape.
    ///
    /// The bucket holds 4 ms at the rate but at least 128 KiB, so that a
    /// whole 64 KiB GSO packet of the veth fits and passes unsplit; the queue
    /// holds 50 ms at the rate before tail drop. A sender in the host itself
    /// is slowed by TCP small queues without drops; traffic from other hosts
    /// is paced by TCP's reaction to the drops.
    pub fn shape(&self, mbit: u32) {
        assert!(mbit > 0, "shape to a positive rate");
        tbf(&self.netns, HOST_IF, mbit);
        tbf(&self.switch_ns, &self.port, mbit);
    }

    /// Removes the limits of [`Host::shape`] (a no-op on an unshaped link).
    pub fn unshape(&self) {
        for (netns, dev) in [
            (&self.netns, HOST_IF),
            (&self.switch_ns, self.port.as_str()),
        ] {
            let _ = run(Command::new("tc").args(["-n", netns, "qdisc", "del", "dev", dev, "root"]));
        }
    }

    /// Bytes sent by this host's `eth0` (everything it uploaded).
    pub fn tx_bytes(&self) -> u64 {
        self.counter("tx_bytes")
    }

    /// Bytes received by this host's `eth0` (everything it downloaded).
    pub fn rx_bytes(&self) -> u64 {
        self.counter("rx_bytes")
    }

    /// Reads `/sys/class/net/eth0/statistics/<name>` inside the namespace.
    fn counter(&self, name: &str) -> u64 {
        let path = format!("/sys/class/net/{HOST_IF}/statistics/{name}");
        let out = must(run(self.command("cat").arg(&path)));
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path} in {}: {e}: {out:?}", self.netns))
    }
}

/// A command running `program` in network namespace `netns` (via `ip netns
/// exec`, which execs it), or directly when `netns` is `None`.
pub fn command_in(netns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Removes the namespaces of test nets whose process is gone (a crashed or
/// killed run), killing whatever still runs in them; their veths and the
/// uplink go with them. Namespaces of live processes are left alone.
///
/// The owner is the pid in the name, so a stale namespace whose pid was
/// reused by another process stays until that process ends.
pub fn cleanup_stale() {
    for netns in list_namespaces() {
        let Some(pid) = owner_pid(&netns) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_all_in(&netns);
        // Another process may be removing the same namespace right now.
        if let Err(e) = try_ip(&format!("netns del {netns}"))
            && list_namespaces().contains(&netns)
        {
            eprintln!("cleaning up a stale test net: {e}");
        }
    }
}

/// The pid in a test net namespace's name: `dfly-<pid>.<n>[-<host>]`.
fn owner_pid(netns: &str) -> Option<u32> {
    let id = netns.strip_prefix(NS_PREFIX)?.split('-').next()?;
    let (pid, n) = id.split_once('.')?;
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    pid.parse().ok()
}

/// A fresh id: this process's pid and its test net count in base 36.
fn next_id() -> String {
    let n = NEXT_NET.fetch_add(1, Ordering::Relaxed);
    format!("{}.{}", std::process::id(), base36(n))
}

fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).expect("digit"));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

/// Host names become part of namespace names: short, `[A-Za-z0-9_]` and
/// `-`, unique.
fn check_host_names(hosts: &[&str]) {
    assert!(hosts.len() < usize::from(ROOT_OCTET), "too many hosts");
    let mut seen = HashSet::new();
    for name in hosts {
        assert!(
            !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "host name {name:?}: use 1-32 of [A-Za-z0-9_-]"
        );
        assert!(seen.insert(name), "host name {name:?} given twice");
    }
}

/// The IPv4 destinations of the root namespace's routes in every table, as
/// (network, prefix length); the default route is left out.
fn root_routes() -> Vec<(Ipv4Addr, u8)> {
    let out = ip("-j -4 route show table all");
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("parse `ip -j route`: {e}: {out}"));
    routes
        .iter()
        .filter_map(|r| r.get("dst")?.as_str())
        .filter(|dst| *dst != "default")
        .map(|dst| {
            let (addr, len) = dst.split_once('/').unwrap_or((dst, "32"));
            let parsed = addr.parse().ok().zip(len.parse().ok());
            parsed.unwrap_or_else(|| panic!("route destination {dst:?}"))
        })
        .collect()
}

/// The first `10.a.b.0/24` (a in [`SUBNET_A`]), starting at a place derived
/// from `id`, that overlaps none of `routes` (network, prefix length).
pub(crate) fn pick_subnet(id: &str, routes: &[(Ipv4Addr, u8)]) -> Ipv4Addr {
    let count = (SUBNET_A.end() - SUBNET_A.start() + 1) as u32 * 256;
    let start = id.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    (0..count)
        .map(|k| {
            let i = (start.wrapping_add(k)) % count;
            Ipv4Addr::new(10, SUBNET_A.start() + (i / 256) as u8, (i % 256) as u8, 0)
        })
        .find(|candidate| !routes.iter().any(|&r| overlaps(r, (*candidate, 24))))
        .unwrap_or_else(|| panic!("every 10.200-254.x.0/24 overlaps a route: {routes:?}"))
}

/// Whether two IPv4 prefixes share an address.
fn overlaps((a, a_len): (Ipv4Addr, u8), (b, b_len): (Ipv4Addr, u8)) -> bool {
    let len = a_len.min(b_len).min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

/// Names of all named network namespaces.
fn list_namespaces() -> Vec<String> {
    ip("netns list")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// SIGKILLs every process in `netns` until none is left (or
/// [`KILL_TIMEOUT`] passes). Killed children of ours stay zombies until
/// their handle reaps them; zombies are in no namespace.
fn kill_all_in(netns: &str) {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let pids = match try_ip(&format!("netns pids {netns}")) {
            Ok(out) => out
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>(),
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        };
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("processes {pids:?} in {netns} survive SIGKILL");
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        sleep(Duration::from_millis(20));
    }
}

/// Writes `value` to the files under `/proc/sys` matching the shell pattern
/// `files` inside `netns`; files that do not exist (no IPv6 or no
/// br_netfilter in the kernel) are skipped.
fn set_proc_sys(netns: &str, files: &str, value: u8) {
    let script = format!("for f in {files}; do [ ! -e \"$f\" ] || echo {value} >\"$f\"; done");
    must(run(command_in(Some(netns), "bash").args(["-c", &script])));
}

/// Replaces the root qdisc of `dev` in `netns` by a token bucket of `mbit`
/// (see [`Host::shape`]).
fn tbf(netns: &str, dev: &str, mbit: u32) {
    let bytes_per_sec = u64::from(mbit) * 1_000_000 / 8;
    let burst = (bytes_per_sec * 4 / 1000).max(128 * 1024);
    let args = format!(
        "-n {netns} qdisc replace dev {dev} root tbf rate {mbit}mbit burst {burst} latency 50ms"
    );
    must(run(Command::new("tc").args(args.split_whitespace())));
}

/// Runs `ip` with the whitespace-separated `args`; panics on failure.
fn ip(args: &str) -> String {
    must(try_ip(args))
}

/// Runs `ip` with the whitespace-separated `args` (names here never hold
/// whitespace).
fn try_ip(args: &str) -> Result<String, String> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// Runs a command to completion: its stdout, or an error naming the command,
/// its exit status and its stderr.
fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value, or a panic with the error.
fn must<T>(result: Result<T, String>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}
