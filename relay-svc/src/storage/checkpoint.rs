//! SQLite's WAL checkpoints, off the write turn.
//!
//! By default the connection that commits runs a checkpoint whenever the
//! WAL has grown past 1,000 pages: inside its `COMMIT`, it copies the
//! WAL's pages into the database file and syncs that file. On the relay
//! that connection is the one writer, holding the write turn, so every
//! few megabytes of writes one transaction — a targeted accept as likely
//! as a campaign's step — held the turn for the checkpoint's I/O as well,
//! with the CPU idle. Here the writer never checkpoints (`wal_autocheckpoint
//! = 0`, set in `open.rs`) and a worker runs a passive checkpoint on a
//! reading connection, every 50 ms while targeted messages are about and
//! every 250 ms otherwise ([`checkpoints`]): in WAL mode a checkpoint
//! takes no write lock, so it runs beside the writer, which only waits for
//! the disk when it syncs the WAL at its own commit. Durability is
//! unchanged: a commit is durable once the WAL is synced, checkpointed or
//! not.

use chukei_proto::server::checkpoints;
use tokio_util::sync::CancellationToken;

use super::Store;
use crate::error::Result;

impl Store {
    /// Copies what the WAL holds into the database file as far as no
    /// reader still needs it (a passive checkpoint; SQLite), without
    /// taking the write turn; returns the WAL's frames and how many of
    /// them are checkpointed now. PostgreSQL checkpoints itself: `None`.
    pub async fn checkpoint_wal(&self) -> Result<Option<(i64, i64)>> {
        match self {
            Self::Sqlite(pool, _) => {
                let (_busy, frames, checkpointed): (i64, i64, i64) =
                    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                        .fetch_one(pool)
                        .await?;
                Ok(Some((frames, checkpointed)))
            }
            Self::Postgres(..) => Ok(None),
        }
    }

    /// Runs [`Store::checkpoint_wal`] often while writers ahead of the bulk
    /// work (targeted accepts) came lately, less often otherwise
    /// ([`checkpoints`]), until `cancel`, then once more (SQLite;
    /// PostgreSQL checkpoints itself, and no task is started).
    pub fn start_checkpoints(
        &self,
        cancel: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let Self::Sqlite(_, groups) = self else {
            return None;
        };
        let (store, groups) = (self.clone(), groups.clone());
        Some(tokio::spawn(checkpoints(
            move || groups.ahead_lately(),
            cancel,
            move || {
                let store = store.clone();
                async move { store.checkpoint_wal().await.map(|_| ()) }
            },
        )))
    }
}
