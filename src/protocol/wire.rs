//! Validation of the mesh API's messages: every field the scheduler uses
//! passes through here first and comes out as a checked Rust value.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use super::Digest;
use super::api;
use super::piece::{piece_count, piece_size};

/// A message field that is malformed, out of range, or inconsistent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMessage(pub String);

/// Longest host id accepted, in bytes.
pub const MAX_HOST_ID_LEN: usize = 128;

/// A daemon as it registers.
#[derive(Debug)]
pub struct HostInfo {
    pub id: String,
    /// The IP of its piece server: the address it must call from.
    pub ip: IpAddr,
    /// `ip:port` of its piece server.
    pub addr: String,
    /// A supernode's seeding peer.
    pub supernode: bool,
}

/// What a daemon holds of one blob.
#[derive(Debug)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    /// Piece numbers (each below the blob's piece count, no repeats) and the
    /// digests the daemon verified them against.
    pub pieces: Vec<(u32, Digest)>,
    pub complete: bool,
    /// The daemon says it is the blob's ingester.
    pub ingesting: bool,
}

fn invalid(message: String) -> InvalidMessage {
    InvalidMessage(message)
}

/// A host id: non-empty and at most [`MAX_HOST_ID_LEN`] bytes.
pub fn host_id(id: &str) -> Result<&str, InvalidMessage> {
    if id.is_empty() || id.len() > MAX_HOST_ID_LEN {
        return Err(invalid(format!(
            "host id must be 1 to {MAX_HOST_ID_LEN} bytes, got {}",
            id.len()
        )));
    }
    Ok(id)
}

/// A registering host: valid id, an IP address peers can be sent to (not
/// unspecified, multicast, broadcast or link-local; loopback is checked per
/// caller by the scheduler) and a non-zero port.
pub fn host(host: Option<&api::Host>) -> Result<HostInfo, InvalidMessage> {
    let host = host.ok_or_else(|| invalid("register without a host".into()))?;
    let id = host_id(&host.id)?.to_owned();
    let ip: IpAddr = host
        .ip
        .parse()
        .map_err(|_| invalid(format!("host {id:?}: invalid ip {:?}", host.ip)))?;
    if !peer_address(ip) {
        return Err(invalid(format!(
            "host {id:?}: {ip} is not an address peers can reach"
        )));
    }
    let port = u16::try_from(host.upload_port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| invalid(format!("host {id:?}: invalid port {}", host.upload_port)))?;
    Ok(HostInfo {
        id,
        ip,
        addr: SocketAddr::new(ip, port).to_string(),
        supernode: host.supernode,
    })
}

/// Whether `ip` can be a peer's address at all: not unspecified, multicast,
/// broadcast or link-local (those name no one host, or a different one for
/// every peer).
fn peer_address(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(ip.is_unspecified() || ip.is_multicast() || link_local)
}

/// A `sha256:<64 hex>` digest.
pub fn digest(text: &str) -> Result<Digest, InvalidMessage> {
    text.parse().map_err(|e| invalid(format!("{e}")))
}

/// A byte count or offset: not negative.
pub fn size(value: i64, what: &str) -> Result<u64, InvalidMessage> {
    u64::try_from(value).map_err(|_| invalid(format!("negative {what}: {value}")))
}

/// A blob's size: not negative, at most [`MAX_BLOB_SIZE`].
pub fn blob_size(value: i64) -> Result<u64, InvalidMessage> {
    let size = size(value, "blob size")?;
    if size > MAX_BLOB_SIZE {
        return Err(invalid(format!(
            "blob of {size} bytes: larger than {MAX_BLOB_SIZE}"
        )));
    }
    Ok(size)
}

/// Piece numbers below `count`, repeats dropped, order kept.
pub fn piece_numbers(numbers: &[u32], count: u32) -> Result<Vec<u32>, InvalidMessage> {
    let mut seen = HashSet::new();
    let mut unique = Vec::with_capacity(numbers.len());
    for &number in numbers {
        check_piece(number, count)?;
        if seen.insert(number) {
            unique.push(number);
        }
    }
    Ok(unique)
}

/// Fails unless `number` is a piece of a blob with `count` pieces.
pub fn check_piece(number: u32, count: u32) -> Result<(), InvalidMessage> {
    if number >= count {
        return Err(invalid(format!(
            "piece {number} out of range: the blob has {count} pieces"
        )));
    }
    Ok(())
}

/// Most blobs one Register may list: a node's store, with room to spare. A
/// larger Register is refused whole (the daemon's state stays unknown until
/// it registers within bounds).
pub const MAX_BLOBS_PER_REGISTER: usize = 4096;
/// Most pieces the blobs of one Register may have in all (by their sizes):
/// 256 GiB of content in 1 MiB pieces, more in blobs over 1 GiB (whose pieces
/// are larger).
pub const MAX_PIECES_PER_REGISTER: u64 = 256 * 1024;
/// Largest blob the mesh handles: 1 TiB.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

/// A registration, checked: the host and what it holds.
#[derive(Debug)]
pub struct Registration {
    pub host: HostInfo,
    pub blobs: Vec<Blob>,
}

/// A Register: a valid host, at most [`MAX_BLOBS_PER_REGISTER`] valid blobs
/// with at most [`MAX_PIECES_PER_REGISTER`] pieces in all.
pub fn registration(request: &api::RegisterRequest) -> Result<Registration, InvalidMessage> {
    let host = host(request.host.as_ref())?;
    if request.blobs.len() > MAX_BLOBS_PER_REGISTER {
        return Err(invalid(format!(
            "host {:?} registers {} blobs, more than {MAX_BLOBS_PER_REGISTER}",
            host.id,
            request.blobs.len()
        )));
    }
    let mut pieces = 0u64;
    let mut blobs = Vec::with_capacity(request.blobs.len());
    for held in &request.blobs {
        let blob = blob(Some(held))?;
        pieces += u64::from(piece_count(blob.size, piece_size(blob.size)));
        if pieces > MAX_PIECES_PER_REGISTER {
            return Err(invalid(format!(
                "host {:?} registers blobs of more than {MAX_PIECES_PER_REGISTER} pieces in all",
                host.id
            )));
        }
        blobs.push(blob);
    }
    Ok(Registration { host, blobs })
}

/// A held blob: valid digests, a size, the piece size every node computes
/// for it ([`piece_size`]), pieces in range and listed once.
pub fn blob(blob: Option<&api::HeldBlob>) -> Result<Blob, InvalidMessage> {
    let blob = blob.ok_or_else(|| invalid("announce without a blob".into()))?;
    let digest = digest(&blob.digest)?;
    let size = blob_size(blob.size)?;
    if blob.piece_size != piece_size(size) {
        return Err(invalid(format!(
            "{digest}: piece size {} is not {} for a blob of {size} bytes",
            blob.piece_size,
            piece_size(size)
        )));
    }
    let count = piece_count(size, blob.piece_size);
    let mut seen = HashSet::new();
    let mut pieces = Vec::with_capacity(blob.pieces.len());
    for piece in &blob.pieces {
        check_piece(piece.number, count).map_err(|e| invalid(format!("{digest}: {e}")))?;
        if !seen.insert(piece.number) {
            return Err(invalid(format!(
                "{digest}: piece {} listed twice",
                piece.number
            )));
        }
        pieces.push((piece.number, self::digest(&piece.digest)?));
    }
    Ok(Blob {
        digest,
        size,
        pieces,
        complete: blob.complete,
        ingesting: blob.ingesting && !blob.complete,
    })
}

/// A transfer outcome other than unspecified.
pub fn outcome(value: i32) -> Result<api::Outcome, InvalidMessage> {
    match api::Outcome::try_from(value) {
        Ok(api::Outcome::Unspecified) | Err(_) => {
            Err(invalid(format!("invalid piece outcome {value}")))
        }
        Ok(outcome) => Ok(outcome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u32) -> String {
        Digest::of(&n.to_le_bytes()).to_string()
    }

    fn held(size: i64, pieces: &[u32]) -> api::HeldBlob {
        api::HeldBlob {
            digest: d(0),
            size,
            piece_size: piece_size(size as u64),
            pieces: pieces
                .iter()
                .map(|&number| api::Piece {
                    number,
                    digest: d(number),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn hosts_need_id_ip_and_port() {
        let good = api::Host {
            id: "node-1".into(),
            ip: "::1".into(),
            upload_port: 65002,
            supernode: false,
        };
        assert_eq!(host(Some(&good)).unwrap().addr, "[::1]:65002");
        for bad in [
            api::Host {
                id: String::new(),
                ..good.clone()
            },
            api::Host {
                id: "x".repeat(129),
                ..good.clone()
            },
            api::Host {
                ip: "node".into(),
                ..good.clone()
            },
            api::Host {
                upload_port: 0,
                ..good.clone()
            },
            api::Host {
                upload_port: 70_000,
                ..good.clone()
            },
            api::Host {
                ip: "0.0.0.0".into(),
                ..good.clone()
            },
            api::Host {
                ip: "169.254.1.2".into(),
                ..good.clone()
            },
            api::Host {
                ip: "fe80::1".into(),
                ..good.clone()
            },
            api::Host {
                ip: "224.0.0.1".into(),
                ..good.clone()
            },
            api::Host {
                ip: "255.255.255.255".into(),
                ..good.clone()
            },
        ] {
            assert!(host(Some(&bad)).is_err(), "accepted {bad:?}");
        }
        assert!(host(None).is_err());
    }

    #[test]
    fn blobs_need_consistent_sizes_and_pieces() {
        // Three pieces, the last one short.
        let size = (5 * crate::protocol::piece::DEFAULT_PIECE_SIZE / 2) as i64;
        assert_eq!(blob(Some(&held(size, &[0, 2]))).unwrap().pieces.len(), 2);
        assert!(blob(Some(&held(size, &[3]))).is_err(), "piece past the end");
        assert!(blob(Some(&held(size, &[1, 1]))).is_err(), "piece twice");
        assert!(blob(Some(&held(-1, &[]))).is_err(), "negative size");
        let mut odd = held(size, &[]);
        odd.piece_size = 1;
        assert!(blob(Some(&odd)).is_err(), "foreign piece size");
        let mut bad_digest = held(size, &[0]);
        bad_digest.pieces[0].digest = "sha256:zz".into();
        assert!(blob(Some(&bad_digest)).is_err());
        bad_digest.digest = "md5:00".into();
        assert!(blob(Some(&bad_digest)).is_err());
    }

    #[test]
    fn registrations_are_bounded() {
        let request = |blobs: Vec<api::HeldBlob>| api::RegisterRequest {
            host: Some(api::Host {
                id: "node-1".into(),
                ip: "10.0.0.1".into(),
                upload_port: 65002,
                supernode: false,
            }),
            blobs,
        };
        let small = held(1, &[]);
        let many = vec![small; MAX_BLOBS_PER_REGISTER];
        assert!(registration(&request(many.clone())).is_ok());
        let mut too_many = many;
        too_many.push(held(1, &[]));
        assert!(registration(&request(too_many)).is_err(), "blob count");
        let huge = MAX_BLOB_SIZE as i64;
        // Every blob this large has MAX_PIECES pieces.
        let at_limit = (MAX_PIECES_PER_REGISTER / crate::protocol::piece::MAX_PIECES) as usize;
        let mut heavy = vec![held(huge, &[]); at_limit];
        assert!(registration(&request(heavy.clone())).is_ok());
        heavy.push(held(huge, &[]));
        assert!(registration(&request(heavy)).is_err(), "pieces in all");
        assert!(blob(Some(&held(huge + 1, &[]))).is_err(), "blob size");
    }

    #[test]
    fn piece_numbers_are_checked_and_deduplicated() {
        assert_eq!(piece_numbers(&[2, 0, 2], 3).unwrap(), [2, 0]);
        assert!(piece_numbers(&[3], 3).is_err());
        assert!(outcome(0).is_err() && outcome(9).is_err());
        assert_eq!(outcome(2).unwrap(), api::Outcome::BadDigest);
    }
}
