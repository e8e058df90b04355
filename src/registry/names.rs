//! Validated names from image labels: a registry host (`name[:port]`, as in
//! `containerd.io/distribution.source.<host>`) and a repository path. Both
//! end up in file paths (the hosts.toml directory) and URLs, so nothing else
//! in the registry client takes them as plain strings.

use std::fmt;
use std::net::Ipv6Addr;
use std::sync::LazyLock;

use regex::Regex;

use super::RegistryError;

/// A registry host as images name it: a DNS name or IPv4 address, or a
/// bracketed IPv6 address, with an optional port. Never contains `/` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryHost(String);

impl RegistryHost {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let invalid =
            |why: &str| RegistryError::InvalidName(format!("registry host {text:?}: {why}"));
        let (name, port) = split_port(text).ok_or_else(|| invalid("malformed port"))?;
        if let Some(port) = port {
            port.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| invalid("port must be 1-65535"))?;
        }
        let valid_name = match name.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .is_some_and(|v6| v6.parse::<Ipv6Addr>().is_ok()),
            None => is_dns_name(name),
        };
        if !valid_name {
            return Err(invalid("expected a DNS name, an IPv4 address or [IPv6]"));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host without its port (brackets of an IPv6 address removed).
    pub fn name(&self) -> &str {
        let (name, _) = split_port(&self.0).expect("validated host");
        name.trim_start_matches('[').trim_end_matches(']')
    }

    /// The port, if the name has one.
    pub fn port(&self) -> Option<&str> {
        split_port(&self.0).expect("validated host").1
    }

    /// localhost or a loopback address (which containerd reaches over plain
    /// HTTP by default).
    pub fn is_loopback(&self) -> bool {
        let name = self.name();
        name == "localhost"
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `name[:port]` (`[v6]:port` for IPv6); None if a `:` is misplaced.
fn split_port(text: &str) -> Option<(&str, Option<&str>)> {
    let after_name = if text.starts_with('[') {
        text.find(']')? + 1
    } else {
        text.find(':').unwrap_or(text.len())
    };
    let (name, rest) = text.split_at(after_name);
    match rest.strip_prefix(':') {
        Some(port) => Some((name, Some(port))),
        None if rest.is_empty() => Some((name, None)),
        None => None,
    }
}

/// Dot-separated labels of letters, digits and inner hyphens.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A repository path as the OCI distribution spec defines it
/// (`library/alpine`): lowercase components joined by `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository(String);

static REPOSITORY: LazyLock<Regex> = LazyLock::new(|| {
    let component = "[a-z0-9]+(?:(?:\\.|_|__|-+)[a-z0-9]+)*";
    Regex::new(&format!("^{component}(?:/{component})*$")).expect("valid regex")
});

impl Repository {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        if text.len() > 255 || !REPOSITORY.is_match(text) {
            return Err(RegistryError::InvalidName(format!(
                "repository {text:?}: expected lowercase components like library/alpine"
            )));
        }
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hosts_with_and_without_ports() {
        for good in [
            "docker.io",
            "127.0.0.1:5000",
            "localhost",
            "my-registry.example.com:443",
            "[::1]:5000",
            "[fe80::1]",
        ] {
            assert!(RegistryHost::parse(good).is_ok(), "rejected {good:?}");
        }
        let host = RegistryHost::parse("[::1]:5000").unwrap();
        assert_eq!((host.name(), host.port()), ("::1", Some("5000")));
        assert!(host.is_loopback());
        assert!(!RegistryHost::parse("docker.io").unwrap().is_loopback());
    }

    #[test]
    fn rejects_hosts_that_could_escape_a_directory() {
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "a..b",
            ".hidden",
            "host:",
            "host:0",
            "host:70000",
            "host:5000:1",
            "-bad.example",
            "[::1",
            "[not-v6]:1",
            "host\0",
            "ho st",
        ] {
            assert!(RegistryHost::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn validates_repositories() {
        for good in ["alpine", "library/alpine", "a/b_c/d-e.f", "x__y"] {
            assert!(Repository::parse(good).is_ok(), "rejected {good:?}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "../a", "A/b", "a/../b", "a?b", "a b",
        ] {
            assert!(Repository::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
