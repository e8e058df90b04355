//! The piece server every dfdaemon runs on its upload port: other nodes
//! fetch verified pieces of blobs (committed, or still being written) with
//! plain HTTP/1.1 GETs, `GET /pieces/sha256/<hex>/<number>`, so curl works
//! too. Bodies go from the page cache to the socket with sendfile(2): no
//! copy through user space. Connections are kept alive for further pieces.
//!
//! Hand-written on purpose: an HTTP framework would read every body through
//! user-space buffers; the request side is parsed by `httparse`.
//!
//! No client can hold it: a request head must arrive within
//! [`HEAD_TIMEOUT`], a kept-alive connection idle for [`IDLE_TIMEOUT`] is
//! closed, a response that makes no progress for [`WRITE_TIMEOUT`] is cut,
//! and an upload whose client stops reading for [`STALL_RELEASE`] gives its
//! upload slot back. Connections are capped per peer address and in total,
//! below the file-descriptor budget ([`super::limits`]); failing `accept`s
//! back off. `Range` (within the piece) is answered with 206, or 416.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::block_in_place;
use tokio::time::timeout;

use super::limits;
use super::tasks::LocalTasks;
use crate::protocol::piece::{piece_count, piece_range, piece_size};
use crate::shutdown::Shutdown;
use crate::store::{Digest, Store};

/// Longest request head accepted.
const MAX_HEAD: usize = 8 << 10;
/// How long a connection may wait before the first byte of a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request head may take from its first byte.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a response may make no progress before the connection is cut.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an upload may wait for its client to read before it gives its
/// upload slot to others (it goes on, slotless, until [`WRITE_TIMEOUT`]).
pub const STALL_RELEASE: Duration = Duration::from_millis(200);
/// Most connections from one peer address.
pub const PER_PEER_CONNECTIONS: usize = 64;
/// Pause after a failed `accept`, doubled while it keeps failing.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this long about failing `accept`s.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// Environment switch, for tests only: serve every piece with one byte
/// flipped, to prove downloaders reject and drop such a peer.
pub const CORRUPT_PIECES_ENV: &str = "DAMSELFLY_FAULT_CORRUPT_PIECES";

/// Counters of the piece server.
#[derive(Default)]
pub struct UploadStats {
    pub pieces: AtomicU64,
    pub bytes: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// Connections closed at once: the total cap was reached.
    pub refused_total: AtomicU64,
    /// Connections closed at once: their peer address was at its cap.
    pub refused_per_peer: AtomicU64,
    /// Connections closed because a request head or the next request did
    /// not come in time.
    pub read_timeouts: AtomicU64,
    /// Responses cut because the client stopped reading.
    pub write_timeouts: AtomicU64,
    /// Uploads that gave their slot back because the client stopped reading.
    pub stalled_releases: AtomicU64,
    /// `accept` failures (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Requests answered 416: a `Range` not within the piece.
    pub range_refused: AtomicU64,
}

/// Serves pieces from the store and from blobs in flight.
pub struct PieceServer {
    store: Arc<Store>,
    tasks: Arc<LocalTasks>,
    /// One permit per concurrent upload.
    slots: Arc<Semaphore>,
    capacity: usize,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    max_connections: usize,
    /// Open connections by peer address.
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    corrupt: bool,
    pub stats: UploadStats,
}

/// An open connection's share of the caps, given back on drop.
struct Admitted<'a> {
    server: &'a PieceServer,
    peer: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut per_peer = self.server.per_peer.lock().expect("per-peer lock");
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// Where a piece's bytes are.
struct Located {
    file: File,
    offset: u64,
    len: u64,
}

impl PieceServer {
    pub fn new(store: Arc<Store>, tasks: Arc<LocalTasks>, upload_slots: usize) -> Arc<Self> {
        let corrupt = std::env::var_os(CORRUPT_PIECES_ENV).is_some();
        if corrupt {
            tracing::warn!("{CORRUPT_PIECES_ENV} is set: serving corrupted pieces (tests only)");
        }
        let nofile = limits::nofile();
        let max_connections = limits::connection_budget(nofile);
        tracing::info!(
            nofile,
            max_connections,
            per_peer = PER_PEER_CONNECTIONS.min(max_connections),
            "piece server connection caps"
        );
        Arc::new(Self {
            store,
            tasks,
            slots: Arc::new(Semaphore::new(upload_slots)),
            capacity: upload_slots,
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            per_peer: Mutex::new(HashMap::new()),
            corrupt,
            stats: UploadStats::default(),
        })
    }

    /// Uploads running now.
    pub fn uploads_in_use(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Connections open now.
    pub fn connections_open(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }

    /// Accepts connections until the task is dropped; each connection is a
    /// task of `shutdown`, which ends it when cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let mut backoff = ACCEPT_BACKOFF;
        let mut last_warning: Option<Instant> = None;
        let mut unwarned = 0u64;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF;
                    accepted
                }
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    unwarned += 1;
                    if last_warning.is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY) {
                        tracing::warn!(error = %e, failures = unwarned, retry_in = ?backoff, "piece server accept failing");
                        last_warning = Some(Instant::now());
                        unwarned = 0;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let server = self.clone();
            shutdown.spawn(async move {
                let Some(_admitted) = server.admit(peer) else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                if let Err(e) = server.connection(stream).await {
                    tracing::trace!(%peer, error = %e, "piece connection ended");
                }
            });
        }
    }

    /// Counts a new connection from `peer` against the caps; `None` (and
    /// the connection is dropped) if it is over one.
    fn admit(&self, peer: SocketAddr) -> Option<Admitted<'_>> {
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let ip = peer.ip().to_canonical();
        let mut per_peer = self.per_peer.lock().expect("per-peer lock");
        let count = per_peer.entry(ip).or_default();
        if *count >= PER_PEER_CONNECTIONS {
            self.stats.refused_per_peer.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *count += 1;
        Some(Admitted {
            server: self,
            peer: ip,
            _permit: permit,
        })
    }

    /// Answers requests on one connection until the peer closes it, or is
    /// too slow to send one.
    async fn connection(&self, mut stream: TcpStream) -> io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        loop {
            let head = read_head(&mut stream, &mut buf).await;
            let head_len = match head {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        self.stats.read_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            };
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            let parsed = request.parse(&buf[..head_len]);
            let (method, path) = match parsed {
                Ok(httparse::Status::Complete(_)) => {
                    (request.method.unwrap_or(""), request.path.unwrap_or(""))
                }
                _ => {
                    respond_error(&mut stream, 400, "bad request").await?;
                    return Ok(());
                }
            };
            let close = request.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
            });
            let range = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("range"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned());
            let result = if method != "GET" {
                respond_error(&mut stream, 405, "only GET").await
            } else {
                let path = path.to_owned();
                self.get(&mut stream, &path, range.as_deref()).await
            };
            if let Err(e) = result {
                if e.kind() == io::ErrorKind::TimedOut {
                    self.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
            buf.drain(..head_len);
            if close {
                return Ok(());
            }
        }
    }

    async fn get(&self, stream: &mut TcpStream, path: &str, range: Option<&str>) -> io::Result<()> {
        let Some((digest, number)) = parse_piece_path(path) else {
            return respond_error(stream, 404, "no such path").await;
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
            return respond_error(stream, 503, "all upload slots busy").await;
        };
        let Some(mut piece) = block_in_place(|| self.locate(&digest, number)) else {
            return respond_error(stream, 404, "piece not held").await;
        };
        let head = match range {
            None => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                piece.len
            ),
            Some(range) => match parse_range(range, piece.len) {
                Some((first, last)) => {
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {first}-{last}/{}\r\nContent-Type: application/octet-stream\r\n\r\n",
                        last - first + 1,
                        piece.len
                    );
                    piece.offset += first;
                    piece.len = last - first + 1;
                    head
                }
                None => {
                    self.stats.range_refused.fetch_add(1, Ordering::Relaxed);
                    let response = format!(
                        "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\n\r\n",
                        piece.len
                    );
                    return write_timed(stream, response.as_bytes()).await;
                }
            },
        };
        write_timed(stream, head.as_bytes()).await?;
        if self.corrupt {
            send_corrupted(stream, &piece).await?;
        } else {
            self.sendfile_all(stream, &piece, permit).await?;
        }
        self.stats.pieces.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(piece.len, Ordering::Relaxed);
        tracing::debug!(%digest, number, len = piece.len, "uploaded piece");
        Ok(())
    }

    /// Sends the piece with sendfile(2), waiting for the socket whenever its
    /// buffer is full: holding `slot` until the client stops reading for
    /// [`STALL_RELEASE`], giving up when it made no progress for
    /// [`WRITE_TIMEOUT`].
    async fn sendfile_all(
        &self,
        stream: &TcpStream,
        piece: &Located,
        slot: OwnedSemaphorePermit,
    ) -> io::Result<()> {
        let mut slot = Some(slot);
        let mut offset = piece.offset as i64;
        let end = (piece.offset + piece.len) as i64;
        let mut progress = Instant::now();
        while offset < end {
            let wait = if slot.is_some() {
                STALL_RELEASE
            } else {
                WRITE_TIMEOUT.saturating_sub(progress.elapsed())
            };
            if timeout(wait, stream.writable()).await.is_err() {
                if slot.take().is_some() {
                    self.stats.stalled_releases.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client stopped reading",
                ));
            }
            let sent = stream.try_io(Interest::WRITABLE, || {
                let count = (end - offset) as usize;
                nix::sys::sendfile::sendfile64(stream, &piece.file, Some(&mut offset), count)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => progress = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if slot.is_some() && progress.elapsed() >= STALL_RELEASE {
                        slot = None;
                        self.stats.stalled_releases.fetch_add(1, Ordering::Relaxed);
                    }
                    if progress.elapsed() >= WRITE_TIMEOUT {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client stopped reading",
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Finds a held piece: verified in a blob in flight, or in a committed blob.
    fn locate(&self, digest: &Digest, number: u32) -> Option<Located> {
        if let Some(task) = self.tasks.get(digest)
            && task.has(number)
            && let Ok(file) = File::open(&task.data)
        {
            let (start, end) = piece_range(number, task.size, task.piece_size);
            return Some(Located {
                file,
                offset: start,
                len: end - start,
            });
        }
        let (file, size) = self.store.open_blob(digest).ok()?;
        let size = size as u64;
        let piece = piece_size(size);
        if number >= piece_count(size, piece) {
            return None;
        }
        let (start, end) = piece_range(number, size, piece);
        Some(Located {
            file,
            offset: start,
            len: end - start,
        })
    }
}

/// Reads until a whole request head is in `buf`; `None` on a clean close.
/// Times out after [`IDLE_TIMEOUT`] without a first byte, or
/// [`HEAD_TIMEOUT`] after it.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + HEAD_TIMEOUT);
    let idle_until = Instant::now() + IDLE_TIMEOUT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let mut chunk = [0u8; 1024];
        let until = deadline.unwrap_or(idle_until);
        let Ok(read) = tokio::time::timeout_at(until.into(), stream.read(&mut chunk)).await else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request in time",
            ));
        };
        let n = read?;
        deadline.get_or_insert_with(|| Instant::now() + HEAD_TIMEOUT);
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `/pieces/sha256/<hex>/<number>` → the validated digest and piece number.
fn parse_piece_path(path: &str) -> Option<(Digest, u32)> {
    let rest = path.strip_prefix("/pieces/sha256/")?;
    let (hex, number) = rest.split_once('/')?;
    let digest = format!("sha256:{hex}").parse().ok()?;
    Some((digest, number.parse().ok()?))
}

/// Whether an `accept` error concerns only the connection being accepted
/// (accepting the next one may work at once).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(nix::libc::EPROTO)
}

/// A `Range` header (`bytes=FIRST-LAST`, `bytes=FIRST-`, `bytes=-SUFFIX`)
/// within a piece of `len` bytes, as the inclusive range it asks for;
/// `None` if it is not one satisfiable range of bytes.
fn parse_range(header: &str, len: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?.trim();
    let (first, last) = spec.split_once('-')?;
    let (first, last) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let suffix: u64 = suffix.parse().ok()?;
            (len.checked_sub(suffix.min(len))?, len.checked_sub(1)?)
        }
        (first, "") => (first.parse().ok()?, len.checked_sub(1)?),
        (first, last) => {
            let last: u64 = last.parse().ok()?;
            (first.parse().ok()?, last.min(len.checked_sub(1)?))
        }
    };
    (first <= last && first < len).then_some((first, last))
}

/// Writes `bytes`, failing with `TimedOut` after [`WRITE_TIMEOUT`].
async fn write_timed(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
}

async fn respond_error(stream: &mut TcpStream, code: u16, why: &str) -> io::Result<()> {
    let reason = match code {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{why}",
        why.len()
    );
    write_timed(stream, response.as_bytes()).await
}

async fn send_corrupted(stream: &mut TcpStream, piece: &Located) -> io::Result<()> {
    let mut data = vec![0u8; piece.len as usize];
    block_in_place(|| {
        std::os::unix::fs::FileExt::read_exact_at(&piece.file, &mut data, piece.offset)
    })?;
    if let Some(first) = data.first_mut() {
        *first ^= 0xff;
    }
    write_timed(stream, &data).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_paths_are_validated() {
        let digest = Digest::of(b"x");
        let good = format!("/pieces/sha256/{}/3", digest.hex());
        assert_eq!(parse_piece_path(&good), Some((digest.clone(), 3)));
        for bad in [
            "/pieces/sha256/../../etc/passwd/1".to_string(),
            format!("/pieces/sha256/{}/-1", digest.hex()),
            format!("/pieces/sha256/{}/x", digest.hex()),
            format!("/pieces/sha512/{}/1", digest.hex()),
            format!("/blobs/sha256/{}", digest.hex()),
        ] {
            assert_eq!(parse_piece_path(&bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_within_the_piece_are_taken_others_refused() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=900-5000", 1000), Some((900, 999)));
        for bad in [
            "bytes=1000-1001",
            "bytes=5-4",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=x-1",
            "bytes=-0",
        ] {
            assert_eq!(parse_range(bad, 1000), None, "{bad}");
        }
    }
}
