//! The faults a chaos run injects: a proxy that cuts a carrier off, the
//! relay's database (a file or a PostgreSQL database), a tiny mount that
//! fills up, and the disk-full phase.

use super::*;

/// A TCP proxy between the relay and one carrier's Deliver port that can cut
/// the link: existing connections are dropped and new ones refused.
pub(super) struct FaultProxy {
    pub(super) addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl FaultProxy {
    pub(super) async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let blocked = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (accept_blocked, accept_links) = (blocked.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accept_blocked.load(Ordering::SeqCst) {
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut links = accept_links.lock().unwrap();
                links.retain(|l| !l.is_finished());
                links.push(link.abort_handle());
            }
        });
        Ok(Self {
            addr,
            blocked,
            links,
        })
    }

    pub(super) fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub(super) fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

/// The relay's database, read directly for the checks.
pub(super) enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    pub(super) async fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(if url.starts_with("sqlite:") {
            Self::Sqlite(sqlx::SqlitePool::connect(url).await?)
        } else {
            Self::Postgres(sqlx::PgPool::connect(url).await?)
        })
    }

    pub(super) async fn count(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(match self {
            Self::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Self::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
        })
    }

    pub(super) async fn pairs(&self, sql: &'static str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(match self {
            Self::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
            Self::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
        })
    }

    pub(super) async fn execute(&self, sql: &'static str) -> anyhow::Result<u64> {
        Ok(match self {
            Self::Sqlite(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
            Self::Postgres(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
        })
    }

    pub(super) async fn close(self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// A tmpfs mounted for the relay's data (the disk-full phase); unmounted on drop.
pub(super) struct Mounted(PathBuf);

impl Mounted {
    pub(super) fn tmpfs(dir: &Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "mount -t tmpfs failed (the disk-full phase needs root)"
        );
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with a file until it is full.
pub(super) fn fill(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    // The last bytes, page by page.
    let page = vec![0u8; 4096];
    while file.write_all(&page).is_ok() {}
    let _ = file.sync_all();
    Ok(path)
}

pub(super) async fn disk_full_phase(
    hub: &mut Hub,
    client: &mut Enterprise,
    refs: &[String],
) -> anyhow::Result<DiskFull> {
    let filler = fill(&hub.relay_data)?;
    let mut disk = DiskFull::default();
    let seed = hub.options.seed;
    let request = |index: usize| {
        let target = if index % 10 == 9 {
            pb::target::Kind::AllRegistered(true)
        } else {
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![refs[index % refs.len()].clone()],
            })
        };
        crate::send_request(
            &format!("chaos-disk-{seed}-{index}"),
            target,
            "disk full",
            common::Channel::Sms,
        )
    };
    let mut refused = Vec::new();
    // Until the relay runs out of room (a full file system still takes
    // commits while SQLite's log has pages to reuse): every tenth a broadcast.
    for index in 0..2_000 {
        if refused.len() >= 20 {
            break;
        }
        disk.attempted += 1;
        match send(client, request(index)).await {
            Outcome::Accepted(id) => {
                disk.accepted_while_full += 1;
                disk.accepted_ids.push(id);
            }
            Outcome::Definite(code) => {
                *disk.refused.entry(format!("{code:?}")).or_default() += 1;
                refused.push(index);
            }
            Outcome::Ambiguous(code) => {
                *disk.refused.entry(code).or_default() += 1;
                refused.push(index);
            }
        }
    }
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    // The relay may have stopped on the full disk; it must come back either way.
    for replica in 0..hub.relays.len() {
        if hub.relays[replica]
            .1
            .as_mut()
            .is_some_and(Process::has_exited)
        {
            hub.spawn_relay(replica)?;
        }
    }
    while freed.elapsed() < Duration::from_secs(30) {
        let request = crate::send_request(
            &format!("chaos-disk-{seed}-after"),
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![refs[0].clone()],
            }),
            "disk has room again",
            common::Channel::Sms,
        );
        if let Outcome::Accepted(id) = send(client, request).await {
            disk.recovered_in = Some(freed.elapsed());
            disk.accepted_ids.push(id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What was refused goes through now, under the same keys.
    for index in refused {
        if let Outcome::Accepted(id) = send(client, request(index)).await {
            disk.accepted_on_retry += 1;
            disk.accepted_ids.push(id);
        }
    }
    Ok(disk)
}
