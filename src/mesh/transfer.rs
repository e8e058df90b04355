//! One piece transfer: a GET of one piece from a parent's piece server,
//! written into the ingest file at its offset and hashed on the way; the
//! piece counts only if its sha256 is the one the supernode published.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::block_in_place;
use tokio::time::timeout;

use crate::store::Digest;

/// How long to wait for a connection to a peer.
const PEER_CONNECT: Duration = Duration::from_secs(2);
/// How long a peer may stay silent in the middle of a piece.
const PEER_IDLE: Duration = Duration::from_secs(5);
/// Read buffer per transfer.
const CHUNK: usize = 256 << 10;

/// One piece to fetch from one parent.
pub struct Transfer {
    pub blob: Digest,
    pub number: u32,
    pub expected: Digest,
    pub parent_id: String,
    pub parent_addr: String,
    /// The parent is a supernode's repo.
    pub from_supernode: bool,
    pub start: u64,
    pub len: u64,
}

/// Why one piece transfer failed, by kind (each kind is counted).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{addr} went silent for {PEER_IDLE:?}")]
    Timeout { addr: String },
    #[error("{addr} answered HTTP {status}")]
    Status { addr: String, status: u16 },
    #[error("short piece from {addr}: {got} of {want} bytes")]
    ShortRead { addr: String, got: u64, want: u64 },
    #[error("piece digest mismatch: got {got}")]
    BadDigest { got: Digest },
    #[error("{addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("write the piece: {0}")]
    Write(std::io::Error),
}

/// The kinds of [`FetchError`], as metrics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Timeout,
    Status,
    ShortRead,
    BadDigest,
    Protocol,
    Write,
}

impl FailureKind {
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Connect,
        FailureKind::Timeout,
        FailureKind::Status,
        FailureKind::ShortRead,
        FailureKind::BadDigest,
        FailureKind::Protocol,
        FailureKind::Write,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Connect => "piece_connect",
            FailureKind::Timeout => "piece_timeout",
            FailureKind::Status => "piece_http_status",
            FailureKind::ShortRead => "piece_short_read",
            FailureKind::BadDigest => "bad_piece",
            FailureKind::Protocol => "piece_protocol",
            FailureKind::Write => "piece_write",
        }
    }
}

impl FetchError {
    pub fn kind(&self) -> FailureKind {
        match self {
            FetchError::Connect { .. } => FailureKind::Connect,
            FetchError::Timeout { .. } => FailureKind::Timeout,
            FetchError::Status { .. } => FailureKind::Status,
            FetchError::ShortRead { .. } => FailureKind::ShortRead,
            FetchError::BadDigest { .. } => FailureKind::BadDigest,
            FetchError::Protocol { .. } => FailureKind::Protocol,
            FetchError::Write(_) => FailureKind::Write,
        }
    }
}

/// Fetches `transfer`'s piece from its parent into `file` at its offset,
/// hashing as it goes; fails unless its sha256 is the published one.
pub async fn fetch(transfer: &Transfer, file: &File) -> Result<(), FetchError> {
    let addr = || transfer.parent_addr.clone();
    let mut stream = timeout(PEER_CONNECT, TcpStream::connect(&transfer.parent_addr))
        .await
        .map_err(|_| FetchError::Connect {
            addr: addr(),
            reason: format!("no answer in {PEER_CONNECT:?}"),
        })?
        .map_err(|e| FetchError::Connect {
            addr: addr(),
            reason: e.to_string(),
        })?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET /pieces/sha256/{}/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        transfer.blob.hex(),
        transfer.number,
        transfer.parent_addr
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| FetchError::Connect {
            addr: addr(),
            reason: format!("send the request: {e}"),
        })?;
    // What came with the head is the start of the body.
    let mut pending = read_response_head(&mut stream, transfer).await?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if !pending.is_empty() {
            let take = pending.len().min((transfer.len - written) as usize);
            hasher.update(&pending[..take]);
            block_in_place(|| file.write_all_at(&pending[..take], transfer.start + written))
                .map_err(FetchError::Write)?;
            written += take as u64;
            pending.clear();
        }
        if written >= transfer.len {
            break;
        }
        let n = read(&mut stream, &mut buf, transfer).await?;
        if n == 0 {
            return Err(FetchError::ShortRead {
                addr: addr(),
                got: written,
                want: transfer.len,
            });
        }
        pending.extend_from_slice(&buf[..n]);
    }
    let got = Digest::from_hasher(hasher);
    if got != transfer.expected {
        return Err(FetchError::BadDigest { got });
    }
    Ok(())
}

/// One read from the parent, bounded by [`PEER_IDLE`].
async fn read(
    stream: &mut TcpStream,
    buf: &mut [u8],
    transfer: &Transfer,
) -> Result<usize, FetchError> {
    timeout(PEER_IDLE, stream.read(buf))
        .await
        .map_err(|_| FetchError::Timeout {
            addr: transfer.parent_addr.clone(),
        })?
        .map_err(|e| FetchError::Protocol {
            addr: transfer.parent_addr.clone(),
            reason: format!("read: {e}"),
        })
}

/// Reads and checks the response head; returns the body bytes read with it.
async fn read_response_head(
    stream: &mut TcpStream,
    transfer: &Transfer,
) -> Result<Vec<u8>, FetchError> {
    let protocol = |reason: &str| FetchError::Protocol {
        addr: transfer.parent_addr.clone(),
        reason: reason.to_owned(),
    };
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > 8 << 10 {
            return Err(protocol("oversized response head"));
        }
        let n = read(stream, &mut chunk, transfer).await?;
        if n == 0 {
            return Err(protocol("connection closed before the response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    if !matches!(
        response.parse(&buf[..head_end]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err(protocol("malformed response head"));
    }
    if response.code != Some(200) {
        return Err(FetchError::Status {
            addr: transfer.parent_addr.clone(),
            status: response.code.unwrap_or(0),
        });
    }
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        });
    if length != Some(transfer.len) {
        return Err(protocol("wrong piece length"));
    }
    Ok(buf.split_off(head_end))
}
