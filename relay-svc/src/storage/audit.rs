//! The audit log: append-only and hash-chained. Each entry's hash covers its
//! own fields and the previous entry's hash, so changing, removing or
//! reordering an entry breaks every link after it; [`Store::verify_audit`]
//! finds the first broken one. Entries name what was done and to which
//! record, never personal values.

use sha2::{Digest, Sha256};

use super::{Store, WritePool, on_pool, on_write, transaction_steps};
use crate::error::Result;

/// One thing to record: who did what to which subject, and why.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditEntry {
    /// `admin`, `enterprise:<id>`, `carrier:<id>` or `relay`.
    pub actor: String,
    /// What was done, e.g. `consent.recorded`, `attributes.used`, `erasure`.
    pub action: String,
    /// The record acted on, e.g. a message id or `enterprise:<id>`.
    pub subject: String,
    /// Counts, purposes and field names; never a personal value.
    pub detail: String,
}

impl AuditEntry {
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            subject: subject.into(),
            detail: detail.into(),
        }
    }
}

/// What [`Store::verify_audit`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditVerification {
    /// Entries read.
    pub entries: u64,
    /// The first entry whose link does not hold, and why; `None`: intact.
    pub first_broken: Option<(i64, &'static str)>,
}

/// The hash of entry `seq` chained to `prev_hash`. Each field is length-
/// prefixed, so no two different entries hash the same input.
pub(crate) fn entry_hash(prev_hash: &str, seq: i64, at: i64, entry: &AuditEntry) -> String {
    let mut hasher = Sha256::new();
    for field in [
        prev_hash,
        &seq.to_string(),
        &at.to_string(),
        &entry.actor,
        &entry.action,
        &entry.subject,
        &entry.detail,
    ] {
        hasher.update(field.len().to_string().as_bytes());
        hasher.update(b":");
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

transaction_steps! {
    /// Recording in the audit log.
    pub(crate) trait AuditSteps {
        /// Appends `entries` to the chain at `at`, inside the caller's write
        /// transaction (either backend). Taking the head row
        /// first serialises appenders: on PostgreSQL the `UPDATE` locks it until
        /// commit; SQLite's write transaction already excludes other writers.
        async fn append_audit(&mut self, at: i64, entries: &[&AuditEntry]) -> Result<()> {
            if !entries.is_empty() {
                sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
                    .execute(&mut *self)
                    .await?;
                let (mut seq, mut hash): (i64, String) =
                    sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                        .fetch_one(&mut *self)
                        .await?;
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO audit_log (seq, at, actor, action, subject, detail, prev_hash, hash) ",
                );
                let mut rows = Vec::with_capacity(entries.len());
                for entry in entries {
                    seq += 1;
                    let next = entry_hash(&hash, seq, at, entry);
                    rows.push((seq, entry, std::mem::replace(&mut hash, next.clone()), next));
                }
                query.push_values(&rows, |mut row, (seq, entry, prev, next)| {
                    row.push_bind(*seq)
                        .push_bind(at)
                        .push_bind(&entry.actor)
                        .push_bind(&entry.action)
                        .push_bind(&entry.subject)
                        .push_bind(&entry.detail)
                        .push_bind(prev)
                        .push_bind(next);
                });
                query.build().execute(&mut *self).await?;
                sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                    .bind(seq)
                    .bind(&hash)
                    .execute(&mut *self)
                    .await?;
            }
            Ok(())
        }
    }
}

/// Entries read per query while verifying.
const VERIFY_PAGE: i64 = 10_000;

/// One stored entry with its place in the chain.
#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    at: i64,
    #[sqlx(flatten)]
    entry: AuditEntry,
    prev_hash: String,
    hash: String,
}

impl Store {
    /// Appends one entry in its own transaction.
    pub async fn audit(&self, at: i64, entry: &AuditEntry) -> Result<()> {
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            tx.append_audit(at, &[entry]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Walks the chain from the first entry: every sequence number in turn,
    /// every entry's `prev_hash` equal to the entry before's hash, every hash
    /// recomputed from the fields, and the head at the last entry.
    pub async fn verify_audit(&self) -> Result<AuditVerification> {
        let mut expected_prev = String::new();
        let mut expected_seq = 1;
        let mut entries = 0;
        loop {
            let page: Vec<Row> = on_pool!(self, pool => sqlx::query_as(
                "SELECT seq, at, actor, action, subject, detail, prev_hash, hash
                 FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2",
            )
            .bind(expected_seq)
            .bind(VERIFY_PAGE)
            .fetch_all(pool)
            .await)?;
            let last_page = (page.len() as i64) < VERIFY_PAGE;
            for Row {
                seq,
                at,
                entry,
                prev_hash,
                hash,
            } in page
            {
                let broken = |reason| {
                    Ok(AuditVerification {
                        entries,
                        first_broken: Some((seq, reason)),
                    })
                };
                if seq != expected_seq {
                    return Ok(AuditVerification {
                        entries,
                        first_broken: Some((expected_seq, "entry missing")),
                    });
                }
                if prev_hash != expected_prev {
                    return broken("prev_hash is not the previous entry's hash");
                }
                if entry_hash(&prev_hash, seq, at, &entry) != hash {
                    return broken("hash does not match the entry's fields");
                }
                entries += 1;
                expected_seq += 1;
                expected_prev = hash;
            }
            if last_page {
                break;
            }
        }
        let (head_seq, head_hash): (i64, String) = on_pool!(self, pool => sqlx::query_as(
            "SELECT seq, hash FROM audit_head WHERE id = 1",
        )
        .fetch_one(pool)
        .await)?;
        let first_broken = if head_seq != expected_seq - 1 {
            Some((expected_seq.min(head_seq), "entries after this are missing"))
        } else if head_hash != expected_prev {
            Some((head_seq, "the head does not hold the last entry's hash"))
        } else {
            None
        };
        Ok(AuditVerification {
            entries,
            first_broken,
        })
    }

    /// The last `limit` entries, newest first.
    pub async fn audit_entries(&self, limit: u32) -> Result<Vec<(i64, i64, AuditEntry)>> {
        let rows: Vec<Row> = on_pool!(self, pool => sqlx::query_as(
            "SELECT seq, at, actor, action, subject, detail, prev_hash, hash
             FROM audit_log ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|row| (row.seq, row.at, row.entry))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_and_the_link_change_the_hash() {
        let entry = AuditEntry::new("admin", "admin.create_enterprise", "enterprise:acme", "");
        let base = entry_hash("", 1, 10, &entry);
        assert_eq!(base, entry_hash("", 1, 10, &entry));
        assert_ne!(base, entry_hash("x", 1, 10, &entry));
        assert_ne!(base, entry_hash("", 2, 10, &entry));
        assert_ne!(base, entry_hash("", 1, 11, &entry));
        let mut moved = entry.clone();
        moved.actor = "admi".into();
        moved.action = "nadmin.create_enterprise".into();
        assert_ne!(base, entry_hash("", 1, 10, &moved));
    }
}
