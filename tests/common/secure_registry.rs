//! What makes a test registry a secure one: a self-signed CA and a server
//! certificate for 127.0.0.1 signed by it (openssl), and a bcrypt htpasswd
//! file with one login (`htpasswd -B`, from apache2-utils). The files are
//! made fresh in a directory of the test's scratch dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The TLS files and the login of a registry that serves HTTPS and asks
/// for Basic credentials.
pub struct Secured {
    /// The CA certificate (PEM), alone in its directory.
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    htpasswd: PathBuf,
    pub username: String,
    pub password: String,
}

impl Secured {
    /// Makes the CA, the server certificate and the htpasswd file in `dir`.
    pub fn create(dir: &Path) -> Self {
        let ca_dir = dir.join("ca");
        fs::create_dir_all(&ca_dir).expect("create the CA dir");
        let secured = Self {
            ca: ca_dir.join("ca.crt"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            htpasswd: dir.join("htpasswd"),
            username: "damselfly".to_owned(),
            password: format!("pw-{}", std::process::id()),
        };
        let ca_key = dir.join("ca-key.pem");
        let csr = dir.join("server.csr");
        let extensions = dir.join("server.ext");
        fs::write(
            &extensions,
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        run(Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "2"])
            .args(ec)
            .args(["-subj", "/CN=damselfly test CA"])
            .args(["-addext", "basicConstraints = critical, CA:TRUE"])
            .args(["-addext", "keyUsage = critical, keyCertSign, cRLSign"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&secured.ca));
        run(Command::new("openssl")
            .args(["req", "-nodes", "-subj", "/CN=127.0.0.1"])
            .args(ec)
            .arg("-keyout")
            .arg(&secured.key)
            .arg("-out")
            .arg(&csr));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&secured.ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(&secured.cert));
        let login =
            run(Command::new("htpasswd").args(["-nbB", &secured.username, &secured.password]));
        fs::write(&secured.htpasswd, login).unwrap();
        secured
    }

    /// The directory holding only the CA, as skopeo's `--dest-cert-dir`
    /// wants it (every `*.crt` there is a CA).
    pub fn ca_dir(&self) -> &Path {
        self.ca.parent().expect("the CA is in a directory")
    }

    /// `user:password`, as skopeo's `--dest-creds` wants it.
    pub fn creds(&self) -> String {
        format!("{}:{}", self.username, self.password)
    }

    /// The lines of docker-registry's config.yml that turn on TLS (under
    /// `http:`) and htpasswd auth.
    pub fn registry_config(&self) -> String {
        format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: damselfly\n    path: {}\n",
            self.cert.display(),
            self.key.display(),
            self.htpasswd.display()
        )
    }

    /// Writes a Docker `config.json` at `path` holding this registry's user
    /// with `password` for `host` (`auths.<host>.auth`: base64 of
    /// `user:password`).
    pub fn write_docker_config(&self, path: &Path, host: &str, password: &str) {
        let pair = format!("{}:{password}", self.username);
        let config = serde_json::json!({ "auths": { host: { "auth": BASE64.encode(pair) } } });
        fs::write(path, config.to_string()).expect("write config.json");
    }
}

/// Runs `command`, panicking with its stderr unless it succeeds; its stdout.
fn run(command: &mut Command) -> Vec<u8> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
