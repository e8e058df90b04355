//! The hook through which snapshots can come from elsewhere than an unpack
//! by containerd: containerd's remote-snapshotter protocol (`snapshot.ref`).

use std::collections::HashMap;

use futures::future::BoxFuture;

/// Asked on a Prepare whose labels carry `containerd.io/snapshot.ref`, before
/// the snapshotter creates the active snapshot. Resolves to true when a
/// committed snapshot labelled snapshot.ref=<target> with this parent now
/// exists (Prepare then answers AlreadyExists, as containerd's remote
/// snapshotters do); false: Prepare goes the ordinary way. Dropped if the
/// client goes away.
pub trait RemoteLayers: Send + Sync + 'static {
    fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> BoxFuture<'static, bool>;
}
