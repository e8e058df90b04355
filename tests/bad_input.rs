//! Bad input over the real socket of a real dfdaemon: every malformed ref,
//! digest, size, offset and commit gets the gRPC error containerd's own store
//! gives, nothing outside the data dir is touched, and nothing half-written
//! becomes visible. Also: a second writer on a ref, and a full disk.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    AbortRequest, DeleteContentRequest, InfoRequest, ReadContentRequest, StatusRequest,
    WriteAction, WriteContentRequest, WriteContentResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use common::{Dfdaemon, Scratch, sha256_bytes};

async fn client(daemon: &Dfdaemon) -> ContentClient<Channel> {
    let channel = containerd_client::connect(&daemon.socket)
        .await
        .expect("connect to dfdaemon");
    ContentClient::new(channel).max_decoding_message_size(64 << 20)
}

fn stat(reference: &str, total: i64, expected: &str) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Stat.into(),
        r#ref: reference.into(),
        total,
        expected: expected.into(),
        ..Default::default()
    }
}

fn write(offset: i64, data: &[u8]) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Write.into(),
        offset,
        data: data.to_vec(),
        ..Default::default()
    }
}

fn commit(total: i64, expected: &str) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Commit.into(),
        total,
        expected: expected.into(),
        offset: -1,
        ..Default::default()
    }
}

/// Sends `requests` on one Write stream; returns the responses and the error
/// that ended the stream, if any.
async fn write_stream(
    client: &mut ContentClient<Channel>,
    requests: Vec<WriteContentRequest>,
) -> (Vec<WriteContentResponse>, Option<tonic::Status>) {
    let mut responses = Vec::new();
    let mut stream = match client.write(tokio_stream::iter(requests)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (responses, Some(status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(r)) => responses.push(r),
            Ok(None) => return (responses, None),
            Err(status) => return (responses, Some(status)),
        }
    }
}

/// The code that ended a stream of `requests` (OK when it ended cleanly).
async fn write_code(
    client: &mut ContentClient<Channel>,
    requests: Vec<WriteContentRequest>,
) -> Code {
    write_stream(client, requests)
        .await
        .1
        .map_or(Code::Ok, |s| s.code())
}

/// Every file and directory below `dir`, except below `skip`.
fn tree(dir: &Path, skip: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.starts_with(skip) {
            continue;
        }
        out.insert(path.display().to_string());
        if path.is_dir() {
            out.extend(tree(&path, skip));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_refs_are_rejected_or_contained() {
    let scratch = Scratch::new();
    let daemon = Dfdaemon::start(&scratch, "d");
    let mut c = client(&daemon).await;
    let outside_before = tree(scratch.path(), &daemon.data_dir);

    for reference in ["", "nul\0byte", "tab\tin-ref", &"x".repeat(5000)] {
        let code = write_code(&mut c, vec![stat(reference, 3, ""), write(0, b"abc")]).await;
        assert_eq!(
            code,
            Code::InvalidArgument,
            "ref {:?}",
            &reference[..reference.len().min(20)]
        );
        let status = c
            .status(StatusRequest {
                r#ref: reference.into(),
            })
            .await;
        assert_eq!(status.unwrap_err().code(), Code::InvalidArgument);
    }
    // containerd's own refs contain '/', so path-like refs are valid names;
    // they must stay names and never become paths.
    for (i, reference) in ["../../../escape", "/etc/dfly-escape", "a/../../b", ".."]
        .iter()
        .enumerate()
    {
        let data = format!("contained {i}");
        let (responses, error) = write_stream(
            &mut c,
            vec![
                stat(reference, 0, ""),
                write(0, data.as_bytes()),
                commit(0, ""),
            ],
        )
        .await;
        assert!(error.is_none(), "{reference}: {error:?}");
        assert_eq!(
            responses.last().unwrap().digest,
            sha256_bytes(data.as_bytes())
        );
    }
    assert_eq!(
        tree(scratch.path(), &daemon.data_dir),
        outside_before,
        "nothing outside the data dir"
    );
    assert!(!Path::new("/etc/dfly-escape").exists());
    for entry in std::fs::read_dir(daemon.data_dir.join("ingest"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "ingest dir {name}"
        );
    }
    daemon.assert_blobs_intact();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_digests_are_invalid_arguments() {
    let scratch = Scratch::new();
    let daemon = Dfdaemon::start(&scratch, "d");
    let mut c = client(&daemon).await;
    let good = sha256_bytes(b"x");
    let hex = good.strip_prefix("sha256:").unwrap();
    let bad = [
        String::new(),
        hex.to_owned(),
        format!("md5:{hex}"),
        format!("sha256:{}", &hex[2..]),
        format!("sha256:{}", hex.to_uppercase()),
        format!("sha256:../../{}", &hex[6..]),
        format!("sha256:{}zz", &hex[2..]),
        format!("sha256:{}\0", &hex[1..]),
    ];
    for digest in &bad {
        let info = c
            .info(InfoRequest {
                digest: digest.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(info.code(), Code::InvalidArgument, "Info {digest:?}");
        let delete = c
            .delete(DeleteContentRequest {
                digest: digest.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(delete.code(), Code::InvalidArgument, "Delete {digest:?}");
        let read = c
            .read(ReadContentRequest {
                digest: digest.clone(),
                offset: 0,
                size: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(read.code(), Code::InvalidArgument, "Read {digest:?}");
        if !digest.is_empty() {
            let code = write_code(&mut c, vec![stat("bad-expected", 1, digest)]).await;
            assert_eq!(code, Code::InvalidArgument, "Write expected {digest:?}");
            let code = write_code(
                &mut c,
                vec![stat("bad-commit", 0, ""), write(0, b"x"), commit(1, digest)],
            )
            .await;
            assert_eq!(code, Code::InvalidArgument, "Commit expected {digest:?}");
        }
    }
    assert!(daemon.blobs().is_empty(), "nothing committed");
    let missing = c
        .info(InfoRequest {
            digest: good.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn sizes_offsets_and_commits_are_checked() {
    let scratch = Scratch::new();
    let daemon = Dfdaemon::start(&scratch, "d");
    let mut c = client(&daemon).await;
    let data = b"0123456789".repeat(100);
    let digest = sha256_bytes(&data);

    assert_eq!(
        write_code(&mut c, vec![stat("neg", -1, "")]).await,
        Code::InvalidArgument
    );
    // A write must land at the current offset.
    let code = write_code(
        &mut c,
        vec![
            stat("off", 0, ""),
            write(0, &data[..10]),
            write(20, &data[20..30]),
        ],
    )
    .await;
    assert_eq!(code, Code::OutOfRange);
    // Commit with the wrong size or digest: FailedPrecondition, nothing
    // visible, the ingest kept intact.
    let wrong_size = write_code(
        &mut c,
        vec![
            stat("c", 0, ""),
            write(0, &data),
            commit(data.len() as i64 + 1, ""),
        ],
    )
    .await;
    assert_eq!(wrong_size, Code::FailedPrecondition);
    let huge = write_code(&mut c, vec![stat("c", 0, ""), commit(i64::MAX, "")]).await;
    assert_eq!(huge, Code::FailedPrecondition);
    let wrong_digest = write_code(
        &mut c,
        vec![stat("c", 0, ""), commit(0, &sha256_bytes(b"other"))],
    )
    .await;
    assert_eq!(wrong_digest, Code::FailedPrecondition);
    assert!(daemon.blobs().is_empty(), "nothing half-written is visible");
    let status = c
        .status(StatusRequest { r#ref: "c".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status.unwrap().offset,
        data.len() as i64,
        "ingest kept intact"
    );
    // The right commit then succeeds.
    let (responses, error) = write_stream(
        &mut c,
        vec![stat("c", 0, ""), commit(data.len() as i64, &digest)],
    )
    .await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(responses.last().unwrap().digest, digest);
    assert_eq!(common::sha256_file(&daemon.blob_path(&digest)), digest);

    // Reads: a negative offset reads from 0, a huge size is cut at the end,
    // an offset past the end is OutOfRange.
    let read = |offset, size| ReadContentRequest {
        digest: digest.clone(),
        offset,
        size,
    };
    let mut all = Vec::new();
    let mut stream = c.read(read(-5, i64::MAX)).await.unwrap().into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        all.extend(m.data);
    }
    assert_eq!(all, data);
    let past = c.read(read(data.len() as i64 + 1, 1)).await;
    let code = match past {
        Err(status) => status.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(code, Code::OutOfRange);
    // Aborting an unknown ref is fine (containerd aborts inside its own
    // transactions); Status of one is NotFound.
    c.abort(AbortRequest {
        r#ref: "never-written".into(),
    })
    .await
    .unwrap();
    let unknown = c
        .status(StatusRequest {
            r#ref: "never-written".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_on_a_ref_is_unavailable() {
    let scratch = Scratch::new();
    let daemon = Dfdaemon::start(&scratch, "d");
    let mut c = client(&daemon).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(stat("busy", 0, "")).await.unwrap();
    let mut first = c
        .clone()
        .write(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    first.message().await.unwrap().expect("first writer's STAT");

    let started = Instant::now();
    let code = write_code(&mut c, vec![stat("busy", 0, "")]).await;
    assert_eq!(code, Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");

    // Once the first writer closes, the ref is free again.
    drop(tx);
    while first.message().await.unwrap().is_some() {}
    assert_eq!(
        write_code(&mut c, vec![stat("busy", 0, "")]).await,
        Code::Ok
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_is_a_clear_error_and_the_store_stays_consistent() {
    common::require_root!();
    let scratch = Scratch::new();
    let data_dir = scratch.join("d-data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "dfly-full"])
        .arg(&data_dir)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a small tmpfs");
    // Scratch unmounts it on drop, also if the test fails.
    let daemon = Dfdaemon::start(&scratch, "d");
    let mut c = client(&daemon).await;

    let small = b"fits".to_vec();
    let (_, error) = write_stream(
        &mut c,
        vec![stat("small", 0, ""), write(0, &small), commit(0, "")],
    )
    .await;
    assert!(error.is_none(), "{error:?}");

    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let chunks: Vec<_> = big
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, d)| write((i << 20) as i64, d))
        .collect();
    let mut requests = vec![stat("big", big.len() as i64, "")];
    requests.extend(chunks);
    requests.push(commit(big.len() as i64, &sha256_bytes(&big)));
    let (_, error) = write_stream(&mut c, requests).await;
    let error = error.expect("writing 8 MiB into 4 MiB fails");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("No space left"),
        "clear message: {}",
        error.message()
    );

    // Consistent: the failed ingest is at a chunk boundary, nothing partial
    // is visible, the earlier blob is intact, and aborting frees the space
    // for new writes.
    let status = c
        .status(StatusRequest {
            r#ref: "big".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        status.offset % (1 << 20),
        0,
        "ingest rolled back to the last whole write"
    );
    assert_eq!(daemon.blobs(), vec![sha256_bytes(&small)]);
    daemon.assert_blobs_intact();
    c.abort(AbortRequest {
        r#ref: "big".into(),
    })
    .await
    .unwrap();
    let again = b"after abort".repeat(1000);
    let (_, error) = write_stream(
        &mut c,
        vec![
            stat("again", 0, ""),
            write(0, &again),
            commit(0, &sha256_bytes(&again)),
        ],
    )
    .await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(daemon.blobs().len(), 2);
}
