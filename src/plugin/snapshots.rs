//! The containerd Snapshots service over the [`Snapshotter`], as
//! containerd's proxy snapshotter calls it: requests are validated here,
//! their work done by the snapshotter off the async threads. A Prepare that
//! names a layer (`containerd.io/snapshot.ref`) asks [`RemoteLayers`] first.

use std::sync::Arc;

use containerd_client::services::v1::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as InfoMessage, Kind as KindMessage,
    ListSnapshotsRequest, ListSnapshotsResponse, MountsRequest, MountsResponse,
    PrepareSnapshotRequest, PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest,
    StatSnapshotResponse, UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest,
    UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};
use containerd_client::types::Mount as MountMessage;
use tokio::task::block_in_place;
use tonic::{Request, Response, Status};

use super::snapshots_api::snapshots_server::Snapshots;
use super::{ResponseStream, batched, label_update, parse_filter, timestamp, validate_labels};
use crate::snapshotter::{Info, Kind, Mount, RemoteLayers, SNAPSHOT_REF_LABEL, Snapshotter};

/// The Snapshots service; with `remote`, layers may come from elsewhere.
pub struct SnapshotsService {
    snapshotter: Arc<Snapshotter>,
    remote: Option<Arc<dyn RemoteLayers>>,
}

impl SnapshotsService {
    pub fn new(snapshotter: Arc<Snapshotter>, remote: Option<Arc<dyn RemoteLayers>>) -> Self {
        Self {
            snapshotter,
            remote,
        }
    }
}

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let request = request.into_inner();
        validate_labels(&request.labels)?;
        if let Some(remote) = &self.remote
            && request.labels.contains_key(SNAPSHOT_REF_LABEL)
            && remote
                .prepare(
                    request.key.clone(),
                    request.parent.clone(),
                    request.labels.clone(),
                )
                .await
        {
            return Err(Status::already_exists(format!(
                "snapshot {}: its layer is already committed",
                request.key
            )));
        }
        let mounts = block_in_place(|| {
            self.snapshotter
                .prepare(&request.key, &request.parent, request.labels)
        })?;
        Ok(Response::new(PrepareSnapshotResponse {
            mounts: mount_messages(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let request = request.into_inner();
        validate_labels(&request.labels)?;
        let mounts = block_in_place(|| {
            self.snapshotter
                .view(&request.key, &request.parent, request.labels)
        })?;
        Ok(Response::new(ViewSnapshotResponse {
            mounts: mount_messages(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let mounts = block_in_place(|| self.snapshotter.mounts(&request.get_ref().key))?;
        Ok(Response::new(MountsResponse {
            mounts: mount_messages(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        validate_labels(&request.labels)?;
        block_in_place(|| {
            self.snapshotter
                .commit(&request.name, &request.key, request.labels)
        })?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        block_in_place(|| self.snapshotter.remove(&request.get_ref().key))?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let info = block_in_place(|| self.snapshotter.stat(&request.get_ref().key))?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info_message(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let request = request.into_inner();
        let info = request
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        validate_labels(&info.labels)?;
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let update = label_update(info.labels, &paths, "a snapshot")?;
        let info = block_in_place(|| self.snapshotter.update(&info.name, update))?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info_message(info)),
        }))
    }

    type ListStream = ResponseStream<ListSnapshotsResponse>;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filter = parse_filter(&request.get_ref().filters)?;
        // A snapshot of the list: containerd's GC removes while it reads.
        let infos: Vec<InfoMessage> = block_in_place(|| self.snapshotter.list())?
            .into_iter()
            .filter(|info| filter.matches(|path| snapshot_field(info, path)))
            .map(info_message)
            .collect();
        Ok(Response::new(batched(&infos, |info| {
            ListSnapshotsResponse { info }
        })))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let usage = block_in_place(|| self.snapshotter.usage(&request.get_ref().key))?;
        Ok(Response::new(UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        block_in_place(|| self.snapshotter.cleanup())?;
        Ok(Response::new(()))
    }
}

/// A field of a snapshot's info, for filters, as containerd's metadata
/// offers them: `name`, `parent` and `kind` (always present, maybe empty)
/// and `labels.<key>`.
fn snapshot_field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path {
        [field] if field == "name" => Some(info.name.as_str()),
        [field] if field == "parent" => Some(info.parent.as_str()),
        [field] if field == "kind" => Some(info.kind.as_str()),
        [field, key @ ..] if field == "labels" && !key.is_empty() => {
            info.labels.get(&key.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

fn info_message(info: Info) -> InfoMessage {
    let kind = match info.kind {
        Kind::View => KindMessage::View,
        Kind::Active => KindMessage::Active,
        Kind::Committed => KindMessage::Committed,
    };
    InfoMessage {
        name: info.name,
        parent: info.parent,
        kind: kind.into(),
        created_at: timestamp(info.created_at),
        updated_at: timestamp(info.updated_at),
        labels: info.labels,
    }
}

fn mount_messages(mounts: Vec<Mount>) -> Vec<MountMessage> {
    mounts
        .into_iter()
        .map(|mount| MountMessage {
            r#type: mount.fs_type,
            source: mount.source,
            target: String::new(),
            options: mount.options,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use futures::future::BoxFuture;

    use super::*;

    /// Commits the layer a Prepare names itself, as the fast path will: an
    /// unpack into a staging directory, committed under a name of its own.
    struct Unpacker {
        snapshotter: Arc<Snapshotter>,
        asked: AtomicUsize,
    }

    impl RemoteLayers for Unpacker {
        fn prepare(
            &self,
            key: String,
            parent: String,
            labels: HashMap<String, String>,
        ) -> BoxFuture<'static, bool> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            let snapshotter = self.snapshotter.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let target = &labels[SNAPSHOT_REF_LABEL];
                    let staging = snapshotter.stage().unwrap();
                    fs::write(staging.fs().join("unpacked"), target).unwrap();
                    let name = format!("{key}-remote");
                    let labels = HashMap::from([(SNAPSHOT_REF_LABEL.to_owned(), target.clone())]);
                    snapshotter
                        .commit_staged(staging, &name, &parent, labels)
                        .is_ok()
                })
                .await
                .unwrap()
            })
        }
    }

    fn service() -> (tempfile::TempDir, SnapshotsService, Arc<Unpacker>) {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Arc::new(Snapshotter::open(dir.path()).unwrap());
        let unpacker = Arc::new(Unpacker {
            snapshotter: snapshotter.clone(),
            asked: AtomicUsize::new(0),
        });
        let service = SnapshotsService::new(snapshotter, Some(unpacker.clone()));
        (dir, service, unpacker)
    }

    fn prepare_request(key: &str, parent: &str, target: Option<&str>) -> PrepareSnapshotRequest {
        PrepareSnapshotRequest {
            key: key.into(),
            parent: parent.into(),
            labels: target
                .map(|t| HashMap::from([(SNAPSHOT_REF_LABEL.to_owned(), t.to_owned())]))
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    async fn walk(service: &SnapshotsService, filter: &str) -> Vec<InfoMessage> {
        let request = ListSnapshotsRequest {
            filters: vec![filter.to_owned()],
            ..Default::default()
        };
        let mut stream = service
            .list(Request::new(request))
            .await
            .unwrap()
            .into_inner();
        let mut infos = Vec::new();
        while let Some(response) = stream.next().await {
            infos.extend(response.unwrap().info);
        }
        infos
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_layer_committed_by_remote_layers_answers_already_exists_and_is_walked_to() {
        let (_dir, service, unpacker) = service();
        let target = "sha256:abcd";
        let status = service
            .prepare(Request::new(prepare_request(
                "ns/1/extract",
                "",
                Some(target),
            )))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::AlreadyExists);
        assert_eq!(unpacker.asked.load(Ordering::Relaxed), 1);

        let filter = format!(r#"labels."{SNAPSHOT_REF_LABEL}"=={target},parent=="""#);
        let found = walk(&service, &filter).await;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "ns/1/extract-remote");
        assert_eq!(found[0].kind, KindMessage::Committed as i32);
        let other_parent = format!(r#"labels."{SNAPSHOT_REF_LABEL}"=={target},parent=="x""#);
        assert!(walk(&service, &other_parent).await.is_empty());

        // No snapshot.ref: not asked, prepared the ordinary way.
        let response = service
            .prepare(Request::new(prepare_request(
                "ns/2/container",
                "ns/1/extract-remote",
                None,
            )))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unpacker.asked.load(Ordering::Relaxed), 1);
        assert_eq!(response.mounts[0].r#type, "overlay");
        assert_eq!(response.mounts.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn when_remote_layers_declines_prepare_goes_the_ordinary_way() {
        let (_dir, service, unpacker) = service();
        // The parent does not exist: the unpacker cannot commit and says false.
        let status = service
            .prepare(Request::new(prepare_request(
                "ns/1/x",
                "missing",
                Some("sha256:1"),
            )))
            .await
            .unwrap_err();
        assert_eq!(unpacker.asked.load(Ordering::Relaxed), 1);
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let response = service
            .prepare(Request::new(prepare_request("ns/1/x", "", None)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.mounts[0].options, ["rw", "rbind"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn filters_select_by_kind_name_and_parent() {
        let (_dir, service, _) = service();
        for (key, parent) in [("a", ""), ("b", "")] {
            service
                .prepare(Request::new(prepare_request(key, parent, None)))
                .await
                .unwrap();
        }
        service
            .commit(Request::new(CommitSnapshotRequest {
                name: "c".into(),
                key: "a".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        service
            .view(Request::new(ViewSnapshotRequest {
                key: "v".into(),
                parent: "c".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let names = |infos: Vec<InfoMessage>| infos.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(walk(&service, "kind==active").await), ["b"]);
        assert_eq!(names(walk(&service, "parent==c").await), ["v"]);
        assert_eq!(names(walk(&service, r#"parent!="""#).await), ["v"]);
        assert_eq!(names(walk(&service, "name==c").await), ["c"]);
        assert_eq!(names(walk(&service, "").await), ["b", "c", "v"]);
        let bad = ListSnapshotsRequest {
            filters: vec!["kind==".into()],
            ..Default::default()
        };
        let status = service.list(Request::new(bad)).await.err().unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
