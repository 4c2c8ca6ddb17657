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
//! reading connection every [`WAL_CHECKPOINT_EVERY`]: in WAL mode a checkpoint
//! takes no write lock, so it runs beside the writer, which only waits for
//! the disk when it syncs the WAL at its own commit. Durability is
//! unchanged: a commit is durable once the WAL is synced, checkpointed or
//! not.

use chukei_proto::server::WAL_CHECKPOINT_EVERY;
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

    /// Runs [`Store::checkpoint_wal`] every [`WAL_CHECKPOINT_EVERY`] until
    /// `cancel`, then once more (SQLite; on PostgreSQL it ends at once).
    pub fn start_checkpoints(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            if matches!(store, Self::Postgres(..)) {
                return;
            }
            chukei_proto::server::every(WAL_CHECKPOINT_EVERY, cancel, || async {
                if let Err(error) = store.checkpoint_wal().await {
                    tracing::warn!(%error, "checkpointing the WAL failed, will retry");
                }
            })
            .await;
        })
    }
}
