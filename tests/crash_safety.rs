//! Crash safety: dfdaemon killed (-9) at arbitrary moments while several
//! clients write and commit blobs. After each restart every acknowledged
//! commit is there and intact, no blob file holds bytes other than its
//! digest says, and every interrupted ingest resumes to the right digest.

mod common;

use std::time::Duration;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{StatusRequest, WriteAction, WriteContentRequest};
use tonic::transport::Channel;

use common::{Dfdaemon, Scratch, sha256_bytes};

/// Rounds of write-then-kill.
const ROUNDS: u64 = 8;
/// Concurrent writers per round.
const WRITERS: u64 = 4;
/// Bytes per write message.
const CHUNK: usize = 256 << 10;

/// Deterministic test bytes for blob `id`, of a size between 1 byte and 6 MiB.
fn blob(id: u64) -> Vec<u8> {
    let mut state = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let size = (next() % (6 << 20)) as usize + 1;
    (0..size).map(|_| next() as u8).collect()
}

fn requests(reference: &str, data: &[u8], from: usize) -> Vec<WriteContentRequest> {
    let mut out = vec![WriteContentRequest {
        action: WriteAction::Stat.into(),
        r#ref: reference.into(),
        total: data.len() as i64,
        ..Default::default()
    }];
    let mut offset = from;
    for chunk in data[from..].chunks(CHUNK) {
        out.push(WriteContentRequest {
            action: WriteAction::Write.into(),
            offset: offset as i64,
            data: chunk.to_vec(),
            ..Default::default()
        });
        offset += chunk.len();
    }
    out.push(WriteContentRequest {
        action: WriteAction::Commit.into(),
        total: data.len() as i64,
        offset: data.len() as i64,
        expected: sha256_bytes(data),
        ..Default::default()
    });
    out
}

/// Writes blob `id` under its ref from byte `from`; returns whether the
/// commit was acknowledged.
async fn write_blob(mut client: ContentClient<Channel>, id: u64, from: usize) -> bool {
    let data = blob(id);
    let Ok(response) = client
        .write(tokio_stream::iter(requests(
            &format!("blob-{id}"),
            &data,
            from,
        )))
        .await
    else {
        return false;
    };
    let mut stream = response.into_inner();
    let mut last = None;
    while let Ok(Some(message)) = stream.message().await {
        last = Some(message);
    }
    last.is_some_and(|m| {
        m.action == i32::from(WriteAction::Commit) && m.digest == sha256_bytes(&data)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_nine_at_any_point_loses_nothing_committed() {
    let scratch = Scratch::new();
    let mut daemon = Dfdaemon::start(&scratch, "d");
    let mut acknowledged = Vec::new();
    let mut interrupted = Vec::new();

    for round in 0..ROUNDS {
        let channel = containerd_client::connect(&daemon.socket).await.unwrap();
        let client = ContentClient::new(channel);
        let ids: Vec<u64> = (0..WRITERS).map(|w| round * 100 + w).collect();
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| (id, tokio::spawn(write_blob(client.clone(), id, 0))))
            .collect();
        // Kill at a moment that varies from round to round: early, mid-write,
        // around commits.
        tokio::time::sleep(Duration::from_millis(20 + round * 45)).await;
        daemon.kill9();
        for (id, task) in tasks {
            if task.await.unwrap() {
                acknowledged.push(id);
            } else {
                interrupted.push(id);
            }
        }
        daemon.restart();
        daemon.assert_blobs_intact();
        for &id in &acknowledged {
            assert!(
                daemon.blob_path(&sha256_bytes(&blob(id))).exists(),
                "acknowledged blob {id} lost"
            );
        }
    }
    assert!(!interrupted.is_empty(), "some writes were caught by a kill");
    assert!(
        !acknowledged.is_empty(),
        "some commits finished before a kill"
    );

    // Every interrupted ingest resumes from where the store says it is.
    let channel = containerd_client::connect(&daemon.socket).await.unwrap();
    let mut client = ContentClient::new(channel);
    for id in interrupted {
        let digest = sha256_bytes(&blob(id));
        if daemon.blob_path(&digest).exists() {
            continue; // committed just before the kill, unacknowledged
        }
        let offset = match client
            .status(StatusRequest {
                r#ref: format!("blob-{id}"),
            })
            .await
        {
            Ok(status) => status.into_inner().status.unwrap().offset as usize,
            Err(status) if status.code() == tonic::Code::NotFound => 0,
            Err(status) => panic!("status of blob-{id}: {status}"),
        };
        assert!(
            write_blob(client.clone(), id, offset).await,
            "resume blob {id} from {offset}"
        );
        assert!(daemon.blob_path(&digest).exists());
    }
    daemon.assert_blobs_intact();
}
