//! The snapshotter's database (redb): each snapshot's record under its name,
//! the parent-child links that keep a parent from being removed under its
//! children, and the counter that names snapshot directories. Directories
//! live on the file system; this holds what they cannot say.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Kind, SnapshotError, Usage};

/// Snapshot records, keyed by name (key).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// One entry `(parent id, child id)` per snapshot that has a parent.
const CHILDREN: TableDefinition<(u64, u64), ()> = TableDefinition::new("children");
/// Counters, by name; [`LAST_ID`] is the last snapshot id handed out.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const LAST_ID: &str = "last_id";

/// The database's page cache: records are small, and node memory is not ours.
const CACHE_BYTES: usize = 4 << 20;

/// What the database knows of one snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory; kept when an active snapshot is committed.
    pub id: u64,
    pub kind: Kind,
    /// Name of the parent, "" for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created_at: i64,
    pub updated_at: i64,
    /// Of a committed snapshot: measured when it was committed.
    pub usage: Usage,
}

/// Handle on the database.
pub struct Metadata {
    db: Database,
}

impl Metadata {
    /// Opens (or creates) the database at `path` and makes sure its tables exist.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| db_error("open snapshot database", e))?;
        let metadata = Self { db };
        metadata.write(|_| Ok(()))?;
        Ok(metadata)
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, SnapshotError> {
        self.read(|table| get(table, name))
    }

    /// The record of `name`, and those of its ancestors, nearest first.
    pub fn chain(&self, name: &str) -> Result<Vec<Record>, SnapshotError> {
        self.read(|table| chain(table, name))
    }

    /// Every snapshot, in name order.
    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        self.read(|table| {
            let mut out = Vec::new();
            for entry in table.iter().map_err(|e| db_error("iterate snapshots", e))? {
                let (name, value) = entry.map_err(|e| db_error("read snapshot", e))?;
                out.push((name.value().to_owned(), decode(value.value())?));
            }
            Ok(out)
        })
    }

    /// Runs `body` over the snapshots table in a read transaction.
    fn read<T>(
        &self,
        body: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_error("begin read", e))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(|e| db_error("open snapshots", e))?;
        body(&table)
    }

    /// Runs `change` in a write transaction, committed only if it succeeds.
    /// Write transactions are serialised: whatever `change` does to the file
    /// system is seen by no other transaction before it commits.
    pub fn write<T>(
        &self,
        change: impl FnOnce(&mut Tx<'_>) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| db_error("begin write", e))?;
        let value = change(&mut Tx::open(&txn)?)?;
        txn.commit().map_err(|e| db_error("commit", e))?;
        Ok(value)
    }
}

/// The tables of one write transaction.
pub struct Tx<'txn> {
    snapshots: Table<'txn, &'static str, &'static [u8]>,
    children: Table<'txn, (u64, u64), ()>,
    counters: Table<'txn, &'static str, u64>,
}

impl<'txn> Tx<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, SnapshotError> {
        Ok(Self {
            snapshots: txn
                .open_table(SNAPSHOTS)
                .map_err(|e| db_error("open snapshots", e))?,
            children: txn
                .open_table(CHILDREN)
                .map_err(|e| db_error("open children", e))?,
            counters: txn
                .open_table(COUNTERS)
                .map_err(|e| db_error("open counters", e))?,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, SnapshotError> {
        get(&self.snapshots, name)
    }

    /// The record of `name`, and those of its ancestors, nearest first.
    pub fn chain(&self, name: &str) -> Result<Vec<Record>, SnapshotError> {
        chain(&self.snapshots, name)
    }

    pub fn put(&mut self, name: &str, record: &Record) -> Result<(), SnapshotError> {
        let bytes = serde_json::to_vec(record).expect("records serialize");
        self.snapshots
            .insert(name, bytes.as_slice())
            .map_err(|e| db_error("insert snapshot", e))?;
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<(), SnapshotError> {
        self.snapshots
            .remove(name)
            .map_err(|e| db_error("remove snapshot", e))?;
        Ok(())
    }

    /// A snapshot id never handed out before.
    pub fn next_id(&mut self) -> Result<u64, SnapshotError> {
        let last = self
            .counters
            .get(LAST_ID)
            .map_err(|e| db_error("read id counter", e))?
            .map(|v| v.value())
            .unwrap_or(0);
        let id = last + 1;
        self.counters
            .insert(LAST_ID, id)
            .map_err(|e| db_error("write id counter", e))?;
        Ok(id)
    }

    pub fn link(&mut self, parent: u64, child: u64) -> Result<(), SnapshotError> {
        self.children
            .insert((parent, child), ())
            .map_err(|e| db_error("insert child link", e))?;
        Ok(())
    }

    pub fn unlink(&mut self, parent: u64, child: u64) -> Result<(), SnapshotError> {
        self.children
            .remove((parent, child))
            .map_err(|e| db_error("remove child link", e))?;
        Ok(())
    }

    pub fn has_children(&self, id: u64) -> Result<bool, SnapshotError> {
        let mut range = self
            .children
            .range((id, 0)..=(id, u64::MAX))
            .map_err(|e| db_error("read child links", e))?;
        Ok(range.next().is_some())
    }

    /// The ids of every snapshot.
    pub fn ids(&self) -> Result<HashSet<u64>, SnapshotError> {
        let mut ids = HashSet::new();
        for entry in self
            .snapshots
            .iter()
            .map_err(|e| db_error("iterate snapshots", e))?
        {
            let (_, value) = entry.map_err(|e| db_error("read snapshot", e))?;
            ids.insert(decode(value.value())?.id);
        }
        Ok(ids)
    }
}

fn get(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<Record>, SnapshotError> {
    let value = table.get(name).map_err(|e| db_error("get snapshot", e))?;
    value.map(|v| decode(v.value())).transpose()
}

fn chain(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Vec<Record>, SnapshotError> {
    let mut records = Vec::new();
    let mut next = name.to_owned();
    while !next.is_empty() {
        let record = get(table, &next)?.ok_or_else(|| match records.last() {
            None => SnapshotError::NotFound(next.clone()),
            Some(_) => SnapshotError::Corrupt(format!("parent {next:?} of a snapshot is missing")),
        })?;
        next = record.parent.clone();
        records.push(record);
    }
    Ok(records)
}

fn decode(bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes)
        .map_err(|e| SnapshotError::Corrupt(format!("undecodable snapshot record: {e}")))
}

fn db_error(what: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Database(format!("{what}: {e}"))
}
