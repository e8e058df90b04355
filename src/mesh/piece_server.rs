//! The piece server every dfdaemon runs on its upload port: other nodes
//! fetch verified pieces of blobs (committed, or still being written) with
//! plain HTTP/1.1 GETs, `GET /pieces/sha256/<hex>/<number>`, so curl works
//! too. Bodies go from the page cache to the socket with sendfile(2): no
//! copy through user space. Connections are kept alive for further pieces.
//!
//! Hand-written on purpose: an HTTP framework would read every body through
//! user-space buffers; the request side is parsed by `httparse`.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::tasks::LocalTasks;
use crate::protocol::piece::{piece_count, piece_range, piece_size};
use crate::store::{Digest, Store};

/// Longest request head accepted.
const MAX_HEAD: usize = 8 << 10;
/// Environment switch, for tests only: serve every piece with one byte
/// flipped, to prove downloaders reject and drop such a peer.
pub const CORRUPT_PIECES_ENV: &str = "DAMSELFLY_FAULT_CORRUPT_PIECES";

/// Counters of the piece server.
#[derive(Default)]
pub struct UploadStats {
    pub pieces: AtomicU64,
    pub bytes: AtomicU64,
    pub rejected_busy: AtomicU64,
}

/// Serves pieces from the store and from blobs in flight.
pub struct PieceServer {
    store: Arc<Store>,
    tasks: Arc<LocalTasks>,
    /// One permit per concurrent upload.
    slots: Arc<Semaphore>,
    capacity: usize,
    corrupt: bool,
    pub stats: UploadStats,
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
        Arc::new(Self {
            store,
            tasks,
            slots: Arc::new(Semaphore::new(upload_slots)),
            capacity: upload_slots,
            corrupt,
            stats: UploadStats::default(),
        })
    }

    /// Uploads running now.
    pub fn uploads_in_use(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "piece server accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(stream).await {
                    tracing::debug!(%peer, error = %e, "piece connection ended");
                }
            });
        }
    }

    /// Answers requests on one connection until the peer closes it.
    async fn connection(&self, mut stream: TcpStream) -> io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        loop {
            let Some(head_len) = read_head(&mut stream, &mut buf).await? else {
                return Ok(());
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
            if method != "GET" {
                respond_error(&mut stream, 405, "only GET").await?;
            } else {
                let path = path.to_owned();
                self.get(&mut stream, &path).await?;
            }
            buf.drain(..head_len);
            if close {
                return Ok(());
            }
        }
    }

    async fn get(&self, stream: &mut TcpStream, path: &str) -> io::Result<()> {
        let Some((digest, number)) = parse_piece_path(path) else {
            return respond_error(stream, 404, "no such path").await;
        };
        let Ok(_permit) = self.slots.clone().try_acquire_owned() else {
            self.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
            return respond_error(stream, 503, "all upload slots busy").await;
        };
        let Some(piece) = self.locate(&digest, number) else {
            return respond_error(stream, 404, "piece not held").await;
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            piece.len
        );
        stream.write_all(head.as_bytes()).await?;
        if self.corrupt {
            send_corrupted(stream, &piece).await?;
        } else {
            sendfile_all(stream, &piece).await?;
        }
        self.stats.pieces.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(piece.len, Ordering::Relaxed);
        tracing::debug!(%digest, number, len = piece.len, "uploaded piece");
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
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
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
        let n = stream.read(&mut chunk).await?;
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
    stream.write_all(response.as_bytes()).await
}

/// Sends the piece with sendfile(2), waiting for the socket whenever its
/// buffer is full.
async fn sendfile_all(stream: &mut TcpStream, piece: &Located) -> io::Result<()> {
    let mut offset = piece.offset as i64;
    let end = (piece.offset + piece.len) as i64;
    while offset < end {
        let socket: &TcpStream = stream;
        socket.writable().await?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            let count = (end - offset) as usize;
            nix::sys::sendfile::sendfile64(socket, &piece.file, Some(&mut offset), count)
                .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn send_corrupted(stream: &mut TcpStream, piece: &Located) -> io::Result<()> {
    let mut data = vec![0u8; piece.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&piece.file, &mut data, piece.offset)?;
    if let Some(first) = data.first_mut() {
        *first ^= 0xff;
    }
    stream.write_all(&data).await
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
}
