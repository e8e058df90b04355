//! The endpoints of a registry host, configured as containerd's CRI does it:
//! `<hosts_dir>/<host>/hosts.toml` (also `<host>_<port>_` and `_default`).
//!
//! A hosts.toml lists mirrors as `[host."<url>"]` tables, tried in file order,
//! then the `server` (the upstream; its settings are the file's top-level
//! keys). Each has `capabilities` (pull, resolve, push; all when absent), `ca`
//! (a file or list of files, added to the system roots), `client` (a file
//! holding certificate and key, or a list of such files or `[cert, key]`
//! pairs; only one client certificate per endpoint is supported),
//! `skip_verify`, `header` (name = value or list of values) and
//! `override_path` (the URL path is the API root, no `/v2` appended).
//! Relative paths are relative to the host's directory.
//!
//! Without a `server` the upstream is the default: `https://<host>`
//! (`registry-1.docker.io` for `docker.io`), and plain `http://` for
//! localhost and loopback addresses: that is what containerd 1.6's
//! `ConfigureHosts` does when CRI gives it no default scheme. A directory
//! without hosts.toml is read the Docker way: `*.crt` are CAs, `*.cert` with
//! its `*.key` a client pair.
//!
//! Unlike containerd, a hosts.toml that does not parse is an error (containerd
//! logs it and silently carries on without it); unknown keys are logged.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::RegistryError;
use super::names::RegistryHost;

/// One place to fetch a registry host's content from.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The API root, e.g. `https://mirror.example/v2`.
    pub api: Url,
    /// Whether blobs may be pulled from it.
    pub pull: bool,
    pub tls: TlsFiles,
    /// Sent with every request to it.
    pub headers: HeaderMap,
}

/// The TLS settings of an endpoint, as file paths (read when its client is
/// built).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsFiles {
    /// PEM CA bundles trusted besides the system roots.
    pub ca: Vec<PathBuf>,
    pub client: Option<ClientPair>,
    pub skip_verify: bool,
}

/// A client certificate and its key; `key` None: both are in `cert`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientPair {
    pub cert: PathBuf,
    pub key: Option<PathBuf>,
}

/// The endpoints for `host`, mirrors first, the upstream last.
pub fn endpoints(hosts_dir: &Path, host: &RegistryHost) -> Result<Vec<Endpoint>, RegistryError> {
    let Some(dir) = host_dir(hosts_dir, host)? else {
        return Ok(vec![default_endpoint(host, TlsFiles::default())]);
    };
    let file = dir.join("hosts.toml");
    match fs::read_to_string(&file) {
        Ok(text) => parse(&text, &dir, host)
            .map_err(|why| RegistryError::Config(format!("{}: {why}", file.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Ok(vec![default_endpoint(host, docker_cert_files(&dir)?)])
        }
        Err(e) => Err(RegistryError::Config(format!(
            "read {}: {e}",
            file.display()
        ))),
    }
}

/// The registry host a `containerd.io/distribution.source.<host>` label
/// means. containerd (1.6) drops the port from that label's key, so a host
/// without a port stands for the one configured `<host>:<port>` (or
/// `<host>_<port>_`) directory under `hosts_dir`, when there is exactly
/// one; otherwise for itself.
pub fn label_host(hosts_dir: &Path, label: &RegistryHost) -> RegistryHost {
    if label.port().is_some() {
        return label.clone();
    }
    let Ok(entries) = fs::read_dir(hosts_dir) else {
        return label.clone();
    };
    let prefix = format!("{}:", label.as_str());
    let underscored = format!("{}_", label.as_str());
    let mut found: Vec<RegistryHost> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let host = if let Some(port) = name.strip_prefix(&underscored) {
                format!("{prefix}{}", port.strip_suffix('_')?)
            } else if name.starts_with(&prefix) {
                name
            } else {
                return None;
            };
            RegistryHost::parse(&host).ok()
        })
        .collect();
    found.dedup();
    match found.as_slice() {
        [only] => only.clone(),
        _ => label.clone(),
    }
}

/// The first of `<host>_<port>_`, `<host>` and `_default` that exists.
fn host_dir(hosts_dir: &Path, host: &RegistryHost) -> Result<Option<PathBuf>, RegistryError> {
    let mut names = Vec::new();
    if let Some(port) = host.port() {
        let name = &host.as_str()[..host.as_str().len() - port.len() - 1];
        names.push(format!("{name}_{port}_"));
    }
    names.extend([host.to_string(), "_default".to_owned()]);
    for name in names {
        let dir = hosts_dir.join(name);
        match fs::metadata(&dir) {
            Ok(_) => return Ok(Some(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RegistryError::Config(format!("{}: {e}", dir.display()))),
        }
    }
    Ok(None)
}

/// What containerd uses when no `server` is configured.
fn default_endpoint(host: &RegistryHost, tls: TlsFiles) -> Endpoint {
    Endpoint {
        api: default_api(host),
        pull: true,
        tls,
        headers: HeaderMap::new(),
    }
}

fn default_api(host: &RegistryHost) -> Url {
    let base = if host.as_str() == "docker.io" {
        "https://registry-1.docker.io".to_owned()
    } else if host.is_loopback() {
        format!("http://{host}")
    } else {
        format!("https://{host}")
    };
    Url::parse(&format!("{base}/v2")).expect("validated host makes a valid URL")
}

#[derive(Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    host: IndexMap<String, Section>,
    #[serde(flatten)]
    upstream: Section,
}

/// The settings of one endpoint: a `[host."…"]` table, or the file's top level.
#[derive(Deserialize)]
struct Section {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    client: Option<ClientSetting>,
    skip_verify: Option<bool>,
    #[serde(default)]
    header: IndexMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ClientSetting {
    /// First: `["a", "b"]` is two files of both cert and key, as in containerd.
    Many(Vec<ClientEntry>),
    One(ClientEntry),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ClientEntry {
    Combined(String),
    Pair([String; 2]),
}

/// Parses a hosts.toml found in `dir`.
fn parse(text: &str, dir: &Path, host: &RegistryHost) -> Result<Vec<Endpoint>, String> {
    let file: HostsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut endpoints = Vec::new();
    for (url, section) in file.host {
        let endpoint = api_root(&url, section.override_path)
            .and_then(|api| section_endpoint(api, section, dir))
            .map_err(|why| format!("[host.{url:?}]: {why}"))?;
        endpoints.push(endpoint);
    }
    let upstream = match &file.server {
        Some(server) => api_root(server, file.upstream.override_path),
        None => Ok(default_api(host)),
    };
    let upstream = upstream
        .and_then(|api| section_endpoint(api, file.upstream, dir))
        .map_err(|why| format!("server: {why}"))?;
    endpoints.push(upstream);
    Ok(endpoints)
}

/// The endpoint at `api` with the settings of `section`.
fn section_endpoint(api: Url, section: Section, dir: &Path) -> Result<Endpoint, String> {
    if !section.unknown.is_empty() {
        let keys: Vec<&String> = section.unknown.keys().collect();
        tracing::warn!(dir = %dir.display(), ?keys, "hosts.toml: ignoring unknown keys");
    }
    Ok(Endpoint {
        api,
        pull: pulls(section.capabilities.as_deref())?,
        tls: TlsFiles {
            ca: section
                .ca
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
                .iter()
                .map(|p| dir.join(p))
                .collect(),
            client: client_pair(section.client, dir)?,
            skip_verify: section.skip_verify.unwrap_or(false),
        },
        headers: headers(section.header)?,
    })
}

/// The API root of an endpoint URL: `https://` unless it says `http://`,
/// `/v2` appended to its path unless `override_path` (or already there).
fn api_root(text: &str, override_path: bool) -> Result<Url, String> {
    let with_scheme = if text.starts_with("http://") || text.starts_with("https://") {
        text.to_owned()
    } else if text.contains("://") {
        return Err(format!("{text:?}: only http:// and https:// endpoints"));
    } else {
        format!("https://{text}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| format!("{text:?}: {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?}: no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!("{text:?}: no query, fragment or user info allowed"));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    if override_path || path.ends_with("/v2") {
        url.set_path(&path);
    } else {
        url.set_path(&format!("{path}/v2"));
    }
    Ok(url)
}

/// Whether a `capabilities` list includes pull (absent or empty: all).
fn pulls(capabilities: Option<&[String]>) -> Result<bool, String> {
    let Some(list) = capabilities.filter(|l| !l.is_empty()) else {
        return Ok(true);
    };
    let mut pull = false;
    for capability in list {
        match capability.to_ascii_lowercase().as_str() {
            "pull" => pull = true,
            "resolve" | "push" => {}
            _ => return Err(format!("unknown capability {capability:?}")),
        }
    }
    Ok(pull)
}

fn client_pair(setting: Option<ClientSetting>, dir: &Path) -> Result<Option<ClientPair>, String> {
    let mut entries = match setting {
        None => return Ok(None),
        Some(ClientSetting::One(entry)) => vec![entry],
        Some(ClientSetting::Many(entries)) => entries,
    };
    if entries.len() > 1 {
        return Err("only one client certificate per endpoint is supported".to_owned());
    }
    Ok(entries.pop().map(|entry| match entry {
        ClientEntry::Combined(both) => ClientPair {
            cert: dir.join(both),
            key: None,
        },
        ClientEntry::Pair([cert, key]) => ClientPair {
            cert: dir.join(cert),
            key: Some(dir.join(key)),
        },
    }))
}

fn headers(table: IndexMap<String, OneOrMany>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, values) in table {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name:?}: {e}"))?;
        for value in values.into_vec() {
            let value = HeaderValue::from_str(&value).map_err(|e| format!("header {name}: {e}"))?;
            headers.append(name.clone(), value);
        }
    }
    Ok(headers)
}

/// Docker's certs.d layout: every `*.crt` a CA, a `*.cert` with the `*.key`
/// of the same name a client pair.
fn docker_cert_files(dir: &Path) -> Result<TlsFiles, RegistryError> {
    let config = |e: io::Error| RegistryError::Config(format!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(config)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(config)?;
    files.sort();
    let with_extension = |ext: &'static str| {
        files
            .iter()
            .filter(move |f| f.extension().is_some_and(|e| e == ext))
    };
    let mut certs = with_extension("cert");
    let client = certs.next().map(|cert| {
        let key = cert.with_extension("key");
        ClientPair {
            cert: cert.clone(),
            key: key.exists().then_some(key),
        }
    });
    if certs.next().is_some() {
        return Err(RegistryError::Config(format!(
            "{}: only one client certificate (*.cert) per host is supported",
            dir.display()
        )));
    }
    Ok(TlsFiles {
        ca: with_extension("crt").cloned().collect(),
        client,
        skip_verify: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> RegistryHost {
        RegistryHost::parse(text).unwrap()
    }

    fn parse_ok(text: &str) -> Vec<Endpoint> {
        parse(text, Path::new("/certs/h"), &host("registry.example:5000")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("/certs/h"), &host("registry.example:5000")).unwrap_err()
    }

    #[test]
    fn defaults_follow_containerd() {
        let api = |h: &str| {
            default_endpoint(&host(h), TlsFiles::default())
                .api
                .to_string()
        };
        assert_eq!(api("docker.io"), "https://registry-1.docker.io/v2");
        assert_eq!(api("quay.io"), "https://quay.io/v2");
        assert_eq!(api("127.0.0.1:5000"), "http://127.0.0.1:5000/v2");
        assert_eq!(api("localhost:5000"), "http://localhost:5000/v2");
        assert_eq!(api("[::1]:5000"), "http://[::1]:5000/v2");
    }

    #[test]
    fn parses_every_field_in_file_order() {
        let endpoints = parse_ok(
            r#"
server = "https://upstream.example"
ca = "upstream-ca.pem"
[header]
  x-upstream = "1"

[host."https://zeta.example:8443"]
  capabilities = ["pull", "Resolve"]
  ca = ["/abs/ca1.pem", "ca2.pem"]
  client = [["client.cert", "client.key"]]
  skip_verify = true
  [host."https://zeta.example:8443".header]
    x-custom = ["a", "b"]
    authorization = "Bearer fixed"

[host."http://alpha.example/custom/api"]
  override_path = true
  capabilities = ["push"]
  client = "both.pem"

[host."mirror.example/prefix/"]
"#,
        );
        let apis: Vec<String> = endpoints.iter().map(|e| e.api.to_string()).collect();
        assert_eq!(
            apis,
            [
                "https://zeta.example:8443/v2",
                "http://alpha.example/custom/api",
                "https://mirror.example/prefix/v2",
                "https://upstream.example/v2",
            ]
        );
        let zeta = &endpoints[0];
        assert!(zeta.pull);
        assert_eq!(
            zeta.tls,
            TlsFiles {
                ca: vec!["/abs/ca1.pem".into(), "/certs/h/ca2.pem".into()],
                client: Some(ClientPair {
                    cert: "/certs/h/client.cert".into(),
                    key: Some("/certs/h/client.key".into()),
                }),
                skip_verify: true,
            }
        );
        let custom: Vec<&HeaderValue> = zeta.headers.get_all("x-custom").iter().collect();
        assert_eq!(custom, ["a", "b"]);
        assert_eq!(zeta.headers["authorization"], "Bearer fixed");

        let alpha = &endpoints[1];
        assert!(!alpha.pull);
        assert_eq!(
            alpha.tls.client,
            Some(ClientPair {
                cert: "/certs/h/both.pem".into(),
                key: None
            })
        );
        let upstream = &endpoints[3];
        assert_eq!(upstream.tls.ca, [PathBuf::from("/certs/h/upstream-ca.pem")]);
        assert_eq!(upstream.headers["x-upstream"], "1");
        assert!(upstream.pull);
    }

    #[test]
    fn without_server_the_upstream_is_the_default_with_top_level_settings() {
        let endpoints = parse_ok("skip_verify = true\n[host.\"http://127.0.0.1:1\"]\n");
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0].api.as_str(), "http://127.0.0.1:1/v2");
        assert_eq!(
            endpoints[1].api.as_str(),
            "https://registry.example:5000/v2"
        );
        assert!(endpoints[1].tls.skip_verify);
    }

    #[test]
    fn server_path_gets_v2_once() {
        let api = |url: &str| api_root(url, false).unwrap().to_string();
        assert_eq!(api("http://h:1"), "http://h:1/v2");
        assert_eq!(api("https://h/v2/"), "https://h/v2");
        assert_eq!(api("https://h/a/../b"), "https://h/b/v2");
        assert_eq!(
            api_root("https://h/raw", true).unwrap().as_str(),
            "https://h/raw"
        );
    }

    #[test]
    fn rejects_bad_input_with_a_clear_error() {
        for (text, expected) in [
            ("server = 5", "server"),
            ("server = \"ftp://h\"", "only http:// and https://"),
            ("server = \"https://\"", "server"),
            ("server = \"https://h/?q=1\"", "no query"),
            ("capabilities = [\"fly\"]", "unknown capability \"fly\""),
            ("skip_verify = \"yes\"", "skip_verify"),
            ("client = [\"a\", \"b\"]", "only one client certificate"),
            ("[header]\n\"bad name\" = \"x\"", "header \"bad name\""),
            ("[header]\nx = \"line\\nbreak\"", "header x"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"pull\", 3]",
                "capabilities",
            ),
            ("not toml", "key"),
        ] {
            let error = parse_err(text);
            assert!(
                error.contains(expected),
                "{text:?}: {error:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn finds_the_host_directory_like_containerd() {
        let root = tempfile::tempdir().unwrap();
        let none = endpoints(root.path(), &host("127.0.0.1:5000")).unwrap();
        assert_eq!(none[0].api.as_str(), "http://127.0.0.1:5000/v2");

        fs::create_dir(root.path().join("_default")).unwrap();
        fs::write(
            root.path().join("_default/hosts.toml"),
            "server = \"https://fallback\"\n",
        )
        .unwrap();
        let default = endpoints(root.path(), &host("other.example")).unwrap();
        assert_eq!(default[0].api.as_str(), "https://fallback/v2");

        let dir = root.path().join("reg.example:5000");
        fs::create_dir(&dir).unwrap();
        fs::write(
            dir.join("hosts.toml"),
            "server = \"http://reg.example:5000\"\n",
        )
        .unwrap();
        let own = endpoints(root.path(), &host("reg.example:5000")).unwrap();
        assert_eq!(own[0].api.as_str(), "http://reg.example:5000/v2");

        fs::write(dir.join("hosts.toml"), "server = [").unwrap();
        let error = endpoints(root.path(), &host("reg.example:5000")).unwrap_err();
        assert!(error.to_string().contains("hosts.toml"), "{error}");
    }

    #[test]
    fn a_directory_without_hosts_toml_is_read_the_docker_way() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("reg.example");
        fs::create_dir(&dir).unwrap();
        for file in ["b.crt", "a.crt", "me.cert", "me.key", "notes.txt"] {
            fs::write(dir.join(file), "").unwrap();
        }
        let endpoints = endpoints(root.path(), &host("reg.example")).unwrap();
        assert_eq!(endpoints[0].api.as_str(), "https://reg.example/v2");
        assert_eq!(endpoints[0].tls.ca, [dir.join("a.crt"), dir.join("b.crt")]);
        assert_eq!(
            endpoints[0].tls.client,
            Some(ClientPair {
                cert: dir.join("me.cert"),
                key: Some(dir.join("me.key"))
            })
        );
    }
}
