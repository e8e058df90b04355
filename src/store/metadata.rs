//! The store's embedded database (redb): labels and timestamps of committed
//! blobs, the piece digests of blobs the mesh may offer, and the parameters
//! of ingests in progress. Blob and ingest *bytes* live in files; this holds
//! only what the file system cannot.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::image_index::{ConfigRecord, ManifestRecord};
use super::{Digest, StoreError};

/// Every table: string keys, byte values.
type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// Committed blobs, keyed by digest string.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// Piece digests of committed blobs, keyed by digest string; see
/// [`PieceRecord`] for the encoding.
const PIECES: TableDefinition<&str, &[u8]> = TableDefinition::new("pieces");
/// Ingests in progress, keyed by ref.
const INGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("ingests");
/// The image index ([`super::image_index`]): manifests by digest.
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("image_manifests");
/// Configs by digest.
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("image_configs");
/// Chain ID → the configs that have it, oldest first (a JSON list).
const CHAINS: TableDefinition<&str, &[u8]> = TableDefinition::new("image_chains");
/// Config digest → the manifests that name it, oldest first (a JSON list).
const CONFIG_MANIFESTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("image_config_manifests");
/// Every table, so that opening the database makes them all.
const TABLES: [TableDefinition<&str, &[u8]>; 7] = [
    BLOBS,
    PIECES,
    INGESTS,
    MANIFESTS,
    CONFIGS,
    CHAINS,
    CONFIG_MANIFESTS,
];

/// The database's page cache: metadata is small, and node memory is not ours.
const CACHE_BYTES: usize = 4 << 20;

/// What the database knows of a committed blob.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Commit time, nanoseconds since the Unix epoch.
    pub created_at: i64,
    /// Last label update, nanoseconds since the Unix epoch.
    pub updated_at: i64,
    pub labels: HashMap<String, String>,
}

/// What the database knows of an ingest in progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestMeta {
    /// Expected total size, 0 when unknown.
    pub total: i64,
    /// Expected digest, empty when unknown.
    pub expected: String,
    /// Start time, nanoseconds since the Unix epoch.
    pub started_at: i64,
    /// Time of the last write, nanoseconds since the Unix epoch.
    pub updated_at: i64,
    /// Set while the mesh writes pieces out of order into the data file:
    /// only the bytes before this offset are known good. A crash leaves the
    /// marker behind, and reopening cuts the file back to it.
    #[serde(default)]
    pub verified_until: Option<i64>,
}

/// The size of a committed blob and the sha256 of each of its pieces, so
/// that a node can offer the blob to peers after a restart without reading
/// it again. Stored as 8 bytes of size and 8 of piece size (little endian),
/// then 32 bytes per piece: a 1 GiB blob in 1 MiB pieces takes 32 KiB.
#[derive(Clone, Debug, PartialEq)]
pub struct PieceRecord {
    pub size: u64,
    pub piece_size: u64,
    pub digests: Vec<Digest>,
}

impl PieceRecord {
    const HEADER: usize = 16;
    const DIGEST: usize = 32;

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::HEADER + Self::DIGEST * self.digests.len());
        bytes.extend_from_slice(&self.size.to_le_bytes());
        bytes.extend_from_slice(&self.piece_size.to_le_bytes());
        for digest in &self.digests {
            bytes.extend_from_slice(&digest.sha256());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("piece record of {} bytes", bytes.len()));
        if bytes.len() < Self::HEADER || !(bytes.len() - Self::HEADER).is_multiple_of(Self::DIGEST)
        {
            return Err(corrupt());
        }
        let (header, digests) = bytes.split_at(Self::HEADER);
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        Ok(Self {
            size: word(0),
            piece_size: word(8),
            digests: digests
                .chunks_exact(Self::DIGEST)
                .map(|raw| Digest::from_sha256(raw.try_into().expect("32 bytes")))
                .collect(),
        })
    }
}

/// Handle on the metadata database.
pub struct Metadata {
    db: Database,
}

impl Metadata {
    /// Opens (or creates) the database at `path` and makes sure its tables exist.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| db_error("open metadata database", e))?;
        let txn = db.begin_write().map_err(|e| db_error("begin", e))?;
        for table in TABLES {
            txn.open_table(table)
                .map_err(|e| db_error("create table", e))?;
        }
        txn.commit().map_err(|e| db_error("commit", e))?;
        Ok(Self { db })
    }

    pub fn blob(&self, digest: &str) -> Result<Option<BlobMeta>, StoreError> {
        self.get(BLOBS, digest)
    }

    pub fn put_blob(&self, digest: &str, meta: &BlobMeta) -> Result<(), StoreError> {
        self.put(BLOBS, digest, meta)
    }

    /// Forgets a blob: its labels, its piece record and its image index
    /// record, in one transaction.
    pub fn remove_blob(&self, digest: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            [BLOBS, PIECES, MANIFESTS, CONFIGS]
                .into_iter()
                .try_for_each(|table| remove(&mut open(txn, table)?, digest))
        })
    }

    /// Records a committed blob's piece digests, unless the blob is gone
    /// (deleted meanwhile): a record never outlives its blob.
    pub fn put_pieces(&self, digest: &str, record: &PieceRecord) -> Result<bool, StoreError> {
        self.write(|txn| {
            let known = open(txn, BLOBS)?
                .get(digest)
                .map_err(|e| db_error("get", e))?
                .is_some();
            if known {
                put_bytes(&mut open(txn, PIECES)?, digest, &record.encode())?;
            }
            Ok(known)
        })
    }

    /// Every piece record, in key order.
    pub fn all_pieces(&self) -> Result<Vec<(String, PieceRecord)>, StoreError> {
        self.entries(PIECES, PieceRecord::decode)
    }

    pub fn ingest(&self, reference: &str) -> Result<Option<IngestMeta>, StoreError> {
        self.get(INGESTS, reference)
    }

    pub fn put_ingest(&self, reference: &str, meta: &IngestMeta) -> Result<(), StoreError> {
        self.put(INGESTS, reference, meta)
    }

    /// Records an ingest's last write time, unless the ingest was removed
    /// (aborted) meanwhile: an abort must not be undone by its writer closing.
    pub fn touch_ingest(&self, reference: &str, updated_at: i64) -> Result<(), StoreError> {
        self.update_ingest(reference, |meta| meta.updated_at = updated_at)
            .map(drop)
    }

    /// Changes an ingest's record with `change`, in one transaction, unless
    /// the ingest was removed (aborted) meanwhile: its writer, still open,
    /// must never bring back a record whose data the abort removed. Whether
    /// the record was there.
    pub fn update_ingest(
        &self,
        reference: &str,
        change: impl FnOnce(&mut IngestMeta),
    ) -> Result<bool, StoreError> {
        self.write(|txn| {
            let mut table = open(txn, INGESTS)?;
            let Some(mut meta) = read::<IngestMeta>(&table, reference)? else {
                return Ok(false);
            };
            change(&mut meta);
            put_json(&mut table, reference, &meta)?;
            Ok(true)
        })
    }

    pub fn remove_ingest(&self, reference: &str) -> Result<(), StoreError> {
        self.remove(INGESTS, reference)
    }

    /// Every ingest ref the database knows, in key order.
    pub fn ingests(&self) -> Result<Vec<(String, IngestMeta)>, StoreError> {
        self.entries(INGESTS, decode)
    }

    /// Indexes a committed manifest, in one transaction with the list of
    /// manifests of its config.
    pub fn index_manifest(&self, digest: &str, record: &ManifestRecord) -> Result<(), StoreError> {
        self.write(|txn| {
            insert(txn, MANIFESTS, digest, record)?;
            append(txn, CONFIG_MANIFESTS, &record.config, digest)
        })
    }

    /// Indexes a committed config under each of its chain IDs.
    pub fn index_config(
        &self,
        digest: &str,
        record: &ConfigRecord,
        chain_ids: &[Digest],
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            insert(txn, CONFIGS, digest, record)?;
            chain_ids
                .iter()
                .try_for_each(|chain| append(txn, CHAINS, chain.as_str(), digest))
        })
    }

    /// The images that have a layer with chain ID `chain`, newest first, as
    /// (manifest, config) records whose blobs are both still indexed.
    pub fn images_with_chain(
        &self,
        chain: &str,
    ) -> Result<Vec<(String, ManifestRecord, String, ConfigRecord)>, StoreError> {
        let txn = self.begin_read()?;
        let open = |table| txn.open_table(table).map_err(|e| db_error("open table", e));
        let (chains, configs, by_config, manifests) = (
            open(CHAINS)?,
            open(CONFIGS)?,
            open(CONFIG_MANIFESTS)?,
            open(MANIFESTS)?,
        );
        let mut found = Vec::new();
        for config in read_list(&chains, chain)?.into_iter().rev() {
            let Some(config_record) = read::<ConfigRecord>(&configs, &config)? else {
                continue;
            };
            for manifest in read_list(&by_config, &config)?.into_iter().rev() {
                if let Some(record) = read::<ManifestRecord>(&manifests, &manifest)? {
                    found.push((manifest, record, config.clone(), config_record.clone()));
                }
            }
        }
        Ok(found)
    }

    /// Runs `body` in one write transaction and commits it.
    fn write<R>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| db_error("begin write", e))?;
        let out = body(&txn)?;
        txn.commit().map_err(|e| db_error("commit", e))?;
        Ok(out)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.db.begin_read().map_err(|e| db_error("begin read", e))
    }

    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.begin_read()?;
        read(
            &txn.open_table(table)
                .map_err(|e| db_error("open table", e))?,
            key,
        )
    }

    /// Every entry of `table`, in key order, its value decoded by `decode`.
    fn entries<T>(
        &self,
        table: Table,
        decode: impl Fn(&[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn
            .open_table(table)
            .map_err(|e| db_error("open table", e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| db_error("iterate", e))? {
            let (key, value) = entry.map_err(|e| db_error("read entry", e))?;
            out.push((key.value().to_owned(), decode(value.value())?));
        }
        Ok(out)
    }

    fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        self.write(|txn| insert(txn, table, key, value))
    }

    fn remove(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.write(|txn| remove(&mut open(txn, table)?, key))
    }
}

fn open<'t>(
    txn: &'t redb::WriteTransaction,
    table: Table,
) -> Result<redb::Table<'t, &'static str, &'static [u8]>, StoreError> {
    txn.open_table(table).map_err(|e| db_error("open table", e))
}

fn put_bytes(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    table
        .insert(key, bytes)
        .map_err(|e| db_error("insert", e))?;
    Ok(())
}

fn put_json<T: Serialize>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    put_bytes(
        table,
        key,
        &serde_json::to_vec(value).expect("metadata serializes"),
    )
}

fn remove(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
) -> Result<(), StoreError> {
    table.remove(key).map_err(|e| db_error("remove", e))?;
    Ok(())
}

fn insert<T: Serialize>(
    txn: &redb::WriteTransaction,
    table: Table,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    put_json(&mut open(txn, table)?, key, value)
}

/// Adds `item` to the JSON list at `key` unless it is there already.
fn append(
    txn: &redb::WriteTransaction,
    table: Table,
    key: &str,
    item: &str,
) -> Result<(), StoreError> {
    let mut list = read_list(&open(txn, table)?, key)?;
    if list.iter().any(|known| known == item) {
        return Ok(());
    }
    list.push(item.to_owned());
    insert(txn, table, key, &list)
}

fn read<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let value = table.get(key).map_err(|e| db_error("get", e))?;
    value.map(|v| decode(v.value())).transpose()
}

fn read_list(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(read(table, key)?.unwrap_or_default())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("undecodable metadata record: {e}")))
}

fn db_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(format!("{what}: {e}"))
}
