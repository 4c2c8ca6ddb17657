//! After a chaos run: settling, the invariants checked against the call
//! history, the journal and the database, and the tampering that proves the
//! checks catch a bad run.

use super::*;

/// See [`Options::tamper`].
pub(super) async fn tamper(db: &Db, journal: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let lost = db
        .execute(
            "DELETE FROM events WHERE (message_id, user_id, kind) IN
               (SELECT message_id, user_id, kind FROM events WHERE kind = 2 ORDER BY message_id LIMIT 1)",
        )
        .await?;
    let gone = db
        .execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE target_kind = 'refs'
               ORDER BY id DESC LIMIT 1)",
        )
        .await?;
    anyhow::ensure!(lost == 1 && gone == 1, "nothing to tamper with");
    let first = std::fs::read_to_string(journal)?
        .lines()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("empty journal"))?;
    let mut parts = first.split(' ');
    let (message_id, user_id) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut file = std::fs::OpenOptions::new().append(true).open(journal)?;
    writeln!(file, "msg_nobody_sent {user_id} 999999998")?;
    writeln!(file, "{message_id} {user_id} 999999999")?;
    Ok(())
}

/// Waits until nothing is left unsent, unconfirmed, unexpanded or unfolded.
pub(super) async fn settle(db: &Db, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let open = db
            .count(
                "SELECT (SELECT COUNT(*) FROM deliveries WHERE state IN (0, 6))
                      + (SELECT COUNT(*) FROM messages WHERE state = 1)
                      + (SELECT COUNT(*) FROM unfolded_events)
                      + (SELECT COUNT(*) FROM deliveries d WHERE d.state = 1 AND NOT EXISTS
                          (SELECT 1 FROM events e WHERE e.message_id = d.message_id
                             AND e.user_id = d.user_id AND e.kind IN (2, 4)))",
            )
            .await?;
        if open == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            eprintln!(
                "chaos: {open} deliveries, messages or unfolded events still open; checking anyway"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The invariants I1..I4 and I6 from what the clients were told
/// (`accepted` message ids, idempotency keys `refused` for sure), the
/// terminals' journal and the database.
pub(super) async fn check(
    db: &Db,
    journal: &Path,
    accepted: &HashSet<String>,
    refused: &HashSet<String>,
) -> anyhow::Result<Violations> {
    let mut v = Violations::default();
    // What reached the terminals: (message, person) → distinct deliveries.
    let mut reached: HashMap<(String, String), HashSet<String>> = HashMap::new();
    for line in std::fs::read_to_string(journal).unwrap_or_default().lines() {
        let mut parts = line.split(' ');
        if let (Some(m), Some(u), Some(d)) = (parts.next(), parts.next(), parts.next()) {
            reached
                .entry((m.to_owned(), u.to_owned()))
                .or_default()
                .insert(d.to_owned());
        }
    }
    let stored: HashSet<String> = db
        .pairs("SELECT id, idempotency_key FROM messages")
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let ended: HashSet<(String, String)> = db
        .pairs("SELECT message_id, user_id FROM events WHERE kind IN (4, 5, 6)")
        .await?
        .into_iter()
        .collect();
    let planned = db
        .pairs("SELECT DISTINCT message_id, user_id FROM deliveries")
        .await?;

    // I1: every accepted message is stored, and each of its people reached or ended.
    v.0[0] += accepted.iter().filter(|id| !stored.contains(*id)).count() as u64;
    for (message_id, user_id) in &planned {
        if !accepted.contains(message_id.as_str()) {
            continue;
        }
        let key = (message_id.clone(), user_id.clone());
        if !reached.contains_key(&key) && !ended.contains(&key) {
            v.0[0] += 1;
        }
    }
    v.0[0] += db
        .count("SELECT COUNT(*) FROM messages WHERE state = 1")
        .await? as u64;

    // I2: nothing reached a terminal for a message no client was told was
    // accepted (every ambiguous call was resolved), and nothing is stored
    // under a key that got a definite error.
    v.0[1] += reached
        .keys()
        .filter(|(m, _)| !accepted.contains(m))
        .count() as u64;
    v.0[1] += db
        .pairs("SELECT id, idempotency_key FROM messages")
        .await?
        .iter()
        .filter(|(_, key)| refused.contains(key))
        .count() as u64;

    // I3: one message per key.
    v.0[2] += db
        .count(
            "SELECT COUNT(*) FROM (SELECT enterprise_id, idempotency_key FROM messages
              GROUP BY enterprise_id, idempotency_key HAVING COUNT(*) > 1) d",
        )
        .await? as u64;

    // I4: a person got a message at most once (one channel, one carrier), and
    // the books never count more sends or opens than people.
    v.0[3] += reached.values().filter(|d| d.len() > 1).count() as u64;
    v.0[3] += db
        .count(
            "SELECT COUNT(*) FROM (SELECT message_id, user_id, kind FROM events
              GROUP BY message_id, user_id, kind HAVING COUNT(*) > 1) d",
        )
        .await? as u64;
    v.0[3] += db
        .count(
            "SELECT COUNT(*) FROM (SELECT e.message_id FROM events e WHERE e.kind = 3
              AND NOT EXISTS (SELECT 1 FROM events d WHERE d.message_id = e.message_id
                AND d.user_id = e.user_id AND d.kind = 2)) o",
        )
        .await? as u64;

    // I6: the per-message counts and the statistics equal a recount of the events.
    v.0[5] += db
        .count(
            "SELECT COUNT(*) FROM (
               SELECT c.message_id FROM message_counts c
                 LEFT JOIN (SELECT message_id, kind, COUNT(*) AS n FROM events GROUP BY message_id, kind) e
                   ON e.message_id = c.message_id AND e.kind = c.kind
                WHERE c.kind BETWEEN 1 AND 6 AND c.count <> COALESCE(e.n, 0)
               UNION ALL
               SELECT e.message_id FROM (SELECT DISTINCT message_id, kind FROM events) e
                 LEFT JOIN message_counts c ON c.message_id = e.message_id AND c.kind = e.kind
                WHERE c.message_id IS NULL) m",
        )
        .await? as u64;
    v.0[5] += db
        .count(
            "SELECT CAST((CASE WHEN (SELECT COALESCE(SUM(delivered), 0) FROM stats_cells)
                          = (SELECT COUNT(*) FROM events WHERE kind = 2) THEN 0 ELSE 1 END)
                  + (CASE WHEN (SELECT COALESCE(SUM(opened), 0) FROM stats_cells)
                          = (SELECT COUNT(*) FROM events WHERE kind = 3) THEN 0 ELSE 1 END) AS BIGINT)",
        )
        .await? as u64;
    Ok(v)
}
