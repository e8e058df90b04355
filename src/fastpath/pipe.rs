//! The pipe from a layer's fetch (async) to its unpacker (a blocking
//! thread), bounded by the bytes in it rather than by a count of chunks: a
//! registry's response chunks can be hundreds of KiB each, so a chunk count
//! alone let every layer in flight hold tens of MiB while its unpacker lagged.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Bytes a pipe holds at most (a larger chunk is let through alone).
const BUDGET: usize = 4 << 20;

/// A chunk in the pipe, with the share of the budget it holds.
struct Chunk {
    bytes: Bytes,
    _budget: OwnedSemaphorePermit,
}

/// The fetch's end; dropping it is the end of the stream.
pub struct PipeSender {
    chunks: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
}

/// The unpacker ended: it reads no more.
#[derive(Debug)]
pub struct Closed;

/// The unpacker's end: a blocking reader, at end of file once the sender is
/// dropped.
pub struct PipeReader {
    chunks: mpsc::UnboundedReceiver<Chunk>,
    current: Option<Chunk>,
}

/// A new, empty pipe.
pub fn pipe() -> (PipeSender, PipeReader) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let sender = PipeSender {
        chunks: sender,
        budget: Arc::new(Semaphore::new(BUDGET)),
    };
    let reader = PipeReader {
        chunks: receiver,
        current: None,
    };
    (sender, reader)
}

impl PipeSender {
    /// Sends `bytes`, waiting while the pipe is full.
    pub async fn send(&self, bytes: Bytes) -> Result<(), Closed> {
        if bytes.is_empty() {
            return Ok(());
        }
        let share = bytes.len().min(BUDGET) as u32;
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(share)
            .await
            .expect("the budget is never closed");
        self.chunks
            .send(Chunk {
                bytes,
                _budget: budget,
            })
            .map_err(|_| Closed)
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.current {
                Some(chunk) if !chunk.bytes.is_empty() => {
                    let n = buf.len().min(chunk.bytes.len());
                    buf[..n].copy_from_slice(&chunk.bytes.split_to(n));
                    return Ok(n);
                }
                _ => {
                    // Dropping the spent chunk gives its budget back; before
                    // waiting, or a full pipe would wait on itself.
                    self.current = None;
                    self.current = self.chunks.blocking_recv();
                    if self.current.is_none() {
                        return Ok(0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_reader_gets_the_chunks_in_order_then_eof() {
        let (sender, mut reader) = pipe();
        let unpacker = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            reader.read_to_string(&mut text).map(|_| text)
        });
        for chunk in [&b"hello "[..], b"", b"layer"] {
            sender.send(Bytes::from_static(chunk)).await.unwrap();
        }
        drop(sender);
        assert_eq!(unpacker.await.unwrap().unwrap(), "hello layer");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_full_pipe_holds_the_sender_until_the_reader_reads() {
        let (sender, mut reader) = pipe();
        sender.send(Bytes::from(vec![1; BUDGET])).await.unwrap();
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            sender.send(Bytes::from_static(b"more")),
        );
        assert!(blocked.await.is_err(), "the budget is spent");
        let mut first = vec![0; BUDGET];
        tokio::task::block_in_place(|| reader.read_exact(&mut first)).unwrap();
        let (read_on, ()) = tokio::join!(
            tokio::task::spawn_blocking(move || {
                let mut rest = Vec::new();
                reader.read_to_end(&mut rest).map(|_| rest)
            }),
            async {
                sender.send(Bytes::from_static(b"more")).await.unwrap();
                drop(sender);
            }
        );
        assert_eq!(read_on.unwrap().unwrap(), b"more");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_gone_reader_closes_the_pipe() {
        let (sender, reader) = pipe();
        drop(reader);
        assert!(sender.send(Bytes::from_static(b"x")).await.is_err());
    }
}
