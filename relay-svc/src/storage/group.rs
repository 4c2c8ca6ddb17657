//! Group commit: writers that arrive while a write transaction is open share
//! it, each inside its own savepoint, and one commit makes all of them durable.
//!
//! A commit is an fsync (SQLite, `synchronous=FULL`) or a WAL flush
//! (PostgreSQL), and SQLite has one writer: one transaction per accepted
//! message held the hub near 750 messages a second on two cores, whatever
//! else was idle. With a [`Group`], the first writer opens the transaction;
//! the writers queued behind it run in the same transaction one after
//! another, each in a savepoint (a refusal or an error rolls back only its
//! own statements); then the group commits once and every member learns the
//! outcome together. The opener needs no savepoint — nothing is in the
//! transaction before it, so undoing it is undoing everything (`ROLLBACK`,
//! and a new transaction for whoever is queued) — which spares an idle hub,
//! where every group has one member, two statements per write. No member
//! returns before the commit that holds its work, so "accepted means
//! durable" holds as before.
//!
//! Who is in a group follows the lock, which is first come, first served:
//! the commit queues for the lock when the opener is done, behind every
//! writer already waiting, and writers arriving after it open the next
//! group. On SQLite the next group begins when the last one has committed
//! (it could not take the write lock sooner); on PostgreSQL at once. On
//! SQLite a group also holds the store's write turn (`Groups::turn`, in
//! `writers.rs`) from its `BEGIN` to its commit, which every writer outside
//! a group takes too; the accepts' group takes it ahead of the writers
//! still waiting.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Weak};

use sqlx::{Database, Executor, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot, watch};

use super::WritePool;
use super::write_turn::{Held, Turn};
use crate::error::{Error, Result};

const SAVEPOINT: &str = "SAVEPOINT chukei_member";
const RELEASE: &str = "RELEASE SAVEPOINT chukei_member";
const ROLLBACK: &str = "ROLLBACK TO SAVEPOINT chukei_member";
const ROLLBACK_ALL: &str = "ROLLBACK";

/// A group's place in the write turn: whether it goes ahead of other
/// writers waiting, and its name in the hold-time metric.
#[derive(Debug)]
struct GroupTurn {
    turn: Arc<Turn>,
    ahead: bool,
    writer: &'static str,
}

/// A group's commit, once it has happened.
type Outcome = Option<Result<(), Arc<sqlx::Error>>>;

/// One engine's shared write transactions (a store holds one or two, see [`Groups`](super::Groups)).
pub struct Group<DB: Database> {
    /// Where writers meet. Held only by the writers in it and by its commit,
    /// so the open transaction goes (rolled back) with the tasks using it —
    /// a runtime dropped mid-group leaves no lock behind — however long the
    /// store lives.
    slot: std::sync::Mutex<Weak<Slot<DB>>>,
    /// The latest group's outcome, which the next waits for on a single-writer engine.
    latest: std::sync::Mutex<watch::Receiver<Outcome>>,
    /// The store's write turn, which a group holds from its `BEGIN` to its
    /// commit ([`Groups::turn`](super::Groups::turn)).
    turn: Option<GroupTurn>,
    /// The store's writer connection, which the group's transactions run
    /// on whatever pool a member offers ([`Groups::writer_or`](super::Groups::writer_or)).
    writer: Option<sqlx::Pool<DB>>,
}

/// The open group, if any: taken out by its commit.
type Slot<DB> = Mutex<Option<Open<DB>>>;

impl<DB: Database> std::fmt::Debug for Group<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").finish_non_exhaustive()
    }
}

/// The transaction a group shares.
struct Open<DB: Database> {
    tx: Transaction<'static, DB>,
    /// How a new transaction begins on this connection (`WritePool::BEGIN`).
    begin: &'static str,
    /// A member gave up (an error, a cancelled call): its statements are
    /// rolled back before anyone else's run.
    abandoned: Option<Undo>,
    /// A savepoint could not be released or rolled back: the transaction is
    /// no longer what its members wrote, so it rolls back entirely.
    broken: bool,
    outcome: watch::Sender<Outcome>,
    /// The store's write turn, released once the group has committed.
    _turn: Option<Held>,
}

/// How to undo an abandoned member's statements.
#[derive(Clone, Copy, Debug)]
enum Undo {
    /// Back to its savepoint.
    Savepoint,
    /// The opener's: the whole transaction, then a new one.
    Everything,
}

/// One writer's place in a group: derefs to the shared connection, inside
/// the writer's own savepoint (the opener: the transaction), until
/// [`Member::commit`].
pub(crate) struct Member<DB: Database> {
    guard: Option<OwnedMutexGuard<Option<Open<DB>>>>,
    /// How its statements are undone if it gives up.
    undo: Undo,
    outcome: watch::Receiver<Outcome>,
    /// Held by the member that opened the group; its commit waits for it.
    opener: Option<oneshot::Sender<()>>,
}

impl<DB: Database> Group<DB> {
    /// A group that holds `turn` from its `BEGIN` to its commit, ahead of
    /// the writers still waiting when `ahead`, with its transactions on
    /// `connection` when given; `writer` names it in the turn's hold-time
    /// metric.
    pub(super) fn taking_turn(
        turn: Arc<Turn>,
        ahead: bool,
        writer: &'static str,
        connection: Option<sqlx::Pool<DB>>,
    ) -> Self {
        Self {
            turn: Some(GroupTurn {
                turn,
                ahead,
                writer,
            }),
            writer: connection,
            ..Self::default()
        }
    }
}

impl<DB: Database> Default for Group<DB> {
    fn default() -> Self {
        let (done, latest) = watch::channel(Some(Ok(())));
        drop(done);
        Self {
            slot: std::sync::Mutex::new(Weak::new()),
            latest: std::sync::Mutex::new(latest),
            turn: None,
            writer: None,
        }
    }
}

impl<DB: Database> Group<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Joins the open group, or opens one on the store's writer connection
    /// (else on `pool`), and starts this writer's savepoint.
    ///
    /// A writer that finds a group open while a writer ahead waits for the
    /// turn (the accepts' group, behind this one) does not join it: the
    /// group commits with the members it has, and this writer joins or
    /// opens the next. So a writer ahead waits for the members already in
    /// the group, not for every one that queues meanwhile.
    pub(crate) async fn join<P: WritePool<Db = DB>>(&self, pool: &P) -> Result<Member<DB>>
    where
        sqlx::Pool<DB>: WritePool<Db = DB>,
    {
        self.join_as(pool, false).await
    }

    /// [`Group::join`] for a control write (a lease renewal): a group it
    /// opens takes the turn ahead without slicing bulk work
    /// ([`Turn::take_for_control`]). Renewed every few seconds, each
    /// counted as a targeted accept coming, they kept a campaign's every
    /// step and hand-over in eighths.
    pub(crate) async fn join_for_control<P: WritePool<Db = DB>>(
        &self,
        pool: &P,
    ) -> Result<Member<DB>>
    where
        sqlx::Pool<DB>: WritePool<Db = DB>,
    {
        self.join_as(pool, true).await
    }

    async fn join_as<P: WritePool<Db = DB>>(&self, pool: &P, control: bool) -> Result<Member<DB>>
    where
        sqlx::Pool<DB>: WritePool<Db = DB>,
    {
        let mut stood_aside = false;
        let (slot, mut guard) = loop {
            let slot = {
                let mut current = self.slot.lock().expect("not poisoned");
                current.upgrade().unwrap_or_else(|| {
                    let slot = Arc::new(Mutex::new(None));
                    *current = Arc::downgrade(&slot);
                    slot
                })
            };
            let guard = slot.clone().lock_owned().await;
            match guard.as_ref() {
                Some(open) if !stood_aside && self.gives_way() => {
                    let mut outcome = open.outcome.subscribe();
                    drop(guard);
                    drop(slot);
                    finished(&mut outcome).await;
                    stood_aside = true;
                }
                _ => break (slot, guard),
            }
        };
        let mut opener = None;
        if guard.is_none() {
            let mut previous = self.latest.lock().expect("not poisoned").clone();
            if P::SINGLE_WRITER {
                finished(&mut previous).await;
            }
            let turn = match &self.turn {
                Some(group) if control && group.ahead => {
                    Some(group.turn.take_for_control(group.writer).await)
                }
                Some(group) => Some(group.turn.take(group.ahead, group.writer).await),
                None => None,
            };
            let tx = match &self.writer {
                Some(writer) => writer.begin_write().await?,
                None => pool.begin_write().await?,
            };
            let (outcome, latest) = watch::channel(None);
            *self.latest.lock().expect("not poisoned") = latest;
            *guard = Some(Open {
                tx,
                begin: P::BEGIN,
                abandoned: None,
                broken: false,
                outcome,
                _turn: turn,
            });
            let (done, wait) = oneshot::channel();
            opener = Some(done);
            tokio::spawn(commit_when_done(slot, wait, previous));
        }
        let open = guard.as_mut().expect("a group is open");
        let outcome = open.outcome.subscribe();
        settle(open).await?;
        let undo = if opener.is_some() {
            Undo::Everything
        } else {
            if let Err(error) = open.tx.execute(SAVEPOINT).await {
                open.broken = true;
                return Err(error.into());
            }
            Undo::Savepoint
        };
        Ok(Member {
            guard: Some(guard),
            undo,
            outcome,
            opener,
        })
    }
}

impl<DB: Database> Group<DB> {
    /// Whether this group should commit now rather than take in another
    /// member: it is not ahead itself, and a writer ahead waits for the turn.
    fn gives_way(&self) -> bool {
        self.turn
            .as_ref()
            .is_some_and(|group| !group.ahead && group.turn.turn.ahead_waiting())
    }
}

/// Rolls back an abandoned member's statements; refuses a broken group.
async fn settle<DB: Database>(open: &mut Open<DB>) -> Result<()>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    if open.broken {
        return Err(Error::Internal(anyhow::anyhow!(
            "the shared write transaction failed and is being rolled back"
        )));
    }
    if let Some(undo) = open.abandoned.take() {
        let (undo, again) = match undo {
            Undo::Savepoint => (ROLLBACK, RELEASE),
            Undo::Everything => (ROLLBACK_ALL, open.begin),
        };
        let undone = match open.tx.execute(undo).await {
            Ok(_) => open.tx.execute(again).await,
            Err(error) => Err(error),
        };
        if let Err(error) = undone {
            open.broken = true;
            return Err(error.into());
        }
    }
    Ok(())
}

/// Waits until a group has committed or rolled back (its result is its
/// members' business; a closed channel is a finished group).
async fn finished(group: &mut watch::Receiver<Outcome>) {
    let _ = group.wait_for(Option::is_some).await;
}

/// The group's commit: once its opener is done, behind every member queued
/// by then, and after the group before it. Groups commit in the order they
/// opened, so rows they insert become visible in id order and a reader that
/// follows ids (a dispatcher's cursor) never passes one still uncommitted.
async fn commit_when_done<DB: Database>(
    slot: Arc<Slot<DB>>,
    opener_done: oneshot::Receiver<()>,
    mut previous: watch::Receiver<Outcome>,
) where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    // Sent or dropped: either way the opener is out of its savepoint.
    let _ = opener_done.await;
    let taken = slot.lock().await.take();
    drop(slot);
    let Some(mut group) = taken else {
        return;
    };
    finished(&mut previous).await;
    let result = match settle(&mut group).await {
        Ok(()) => group.tx.commit().await.map_err(Arc::new),
        Err(error) => {
            let rolled_back = group.tx.rollback().await;
            Err(Arc::new(rolled_back.err().unwrap_or_else(|| {
                sqlx::Error::Protocol(format!("group rolled back: {error}"))
            })))
        }
    };
    // The write lock went with the commit: the turn goes before the
    // members learn the outcome, so its hold ends when the commit did.
    drop(group._turn);
    group.outcome.send_replace(Some(result));
}

impl<DB: Database> Member<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Ends this writer's savepoint and waits for the group's commit: `Ok`
    /// only once everything this member wrote is durable.
    pub(crate) async fn commit(mut self) -> Result<()> {
        let mut guard = self.guard.take().expect("a member holds its group");
        let open = guard.as_mut().expect("a member's group is open");
        if let Undo::Savepoint = self.undo
            && let Err(error) = open.tx.execute(RELEASE).await
        {
            open.broken = true;
            return Err(error.into());
        }
        drop(guard);
        self.opener.take();
        self.wait().await
    }

    /// Rolls back this writer's savepoint now and waits for the group's
    /// commit, so what other members wrote (a concurrent call with the same
    /// idempotency key) can be read once this returns.
    pub(crate) async fn roll_back(mut self) -> Result<()> {
        let mut guard = self.guard.take().expect("a member holds its group");
        let open = guard.as_mut().expect("a member's group is open");
        open.abandoned = Some(self.undo);
        settle(open).await?;
        drop(guard);
        self.opener.take();
        self.wait().await
    }

    async fn wait(&mut self) -> Result<()> {
        let outcome = self
            .outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Internal(anyhow::anyhow!("a group commit was abandoned")))?
            .clone();
        match outcome {
            Some(Err(cause)) => Err(Error::shared(&cause)),
            _ => Ok(()),
        }
    }

    fn open(&self) -> &Open<DB> {
        self.guard
            .as_ref()
            .and_then(|guard| guard.as_ref())
            .expect("a member's group is open")
    }
}

impl<DB: Database> Drop for Member<DB> {
    fn drop(&mut self) {
        // Dropped inside its savepoint (`?` on an error, a cancelled call):
        // whoever takes the lock next rolls the savepoint back first.
        if let Some(open) = self.guard.as_mut().and_then(|guard| guard.as_mut()) {
            open.abandoned = Some(self.undo);
        }
    }
}

impl<DB: Database> Deref for Member<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    type Target = DB::Connection;

    fn deref(&self) -> &Self::Target {
        &self.open().tx
    }
}

impl<DB: Database> DerefMut for Member<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    fn deref_mut(&mut self) -> &mut Self::Target {
        let open = self
            .guard
            .as_mut()
            .and_then(|guard| guard.as_mut())
            .expect("a member's group is open");
        &mut open.tx
    }
}

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
