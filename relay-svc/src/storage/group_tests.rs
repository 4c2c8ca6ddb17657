use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::SqlitePoolOptions;

use super::*;
use crate::storage::Groups;

async fn pool() -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect("sqlite::memory:")
        .await
        .expect("an in-memory database")
}

/// Whether `task` is still waiting after a moment (it cannot finish
/// while what it waits for is held, however long the moment).
async fn still_waiting<T>(task: &mut tokio::task::JoinHandle<T>) -> bool {
    tokio::time::timeout(Duration::from_millis(50), task)
        .await
        .is_err()
}

#[tokio::test]
async fn writers_outside_a_group_take_turns_with_it_in_order() {
    let pool = pool().await;
    let groups = Arc::new(Groups::<sqlx::Sqlite>::taking_turns(None));

    // A group is open: a writer outside it waits for its commit.
    let member = groups.accepts.join(&pool).await.unwrap();
    let (release, released) = oneshot::channel::<()>();
    let mut outside = tokio::spawn({
        let groups = groups.clone();
        async move {
            let turn = groups.turn().await;
            assert!(turn.is_some(), "SQLite writers take turns");
            let _ = released.await;
        }
    });
    assert!(still_waiting(&mut outside).await);
    member.commit().await.unwrap();

    // The outside writer has the turn now: the next group waits for it.
    let mut next = tokio::spawn({
        let (groups, pool) = (groups.clone(), pool.clone());
        async move { groups.deliveries.join(&pool).await.unwrap().commit().await }
    });
    assert!(still_waiting(&mut next).await);
    release.send(()).unwrap();
    outside.await.unwrap();
    next.await.unwrap().unwrap();
}

/// Members of one group each undo only their own work: a member
/// refused between two that succeed takes neither's rows with it.
#[tokio::test]
async fn a_refused_member_undoes_only_its_own_work() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("group.db").display()
    );
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (name TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let groups = Arc::new(Groups::<sqlx::Sqlite>::taking_turns(None));
    let insert = |name: &'static str| sqlx::query("INSERT INTO t (name) VALUES ($1)").bind(name);

    let mut opener = groups.accepts.join(&pool).await.unwrap();
    insert("first").execute(&mut *opener).await.unwrap();
    let member = |name: &'static str, refused: bool| {
        let (groups, pool) = (groups.clone(), pool.clone());
        tokio::spawn(async move {
            let mut member = groups.accepts.join(&pool).await.unwrap();
            insert(name).execute(&mut *member).await.unwrap();
            if refused {
                member.roll_back().await
            } else {
                member.commit().await
            }
        })
    };
    let mut refused = member("refused", true);
    assert!(
        still_waiting(&mut refused).await,
        "queued behind the opener"
    );
    let mut last = member("last", false);
    assert!(still_waiting(&mut last).await, "queued behind the refused");
    opener.commit().await.unwrap();
    refused.await.unwrap().unwrap();
    last.await.unwrap().unwrap();

    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM t ORDER BY name")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, ["first", "last"]);
}

/// A writer that takes the turn and holds it until told to let go.
fn holder(
    groups: &Arc<Groups<sqlx::Sqlite>>,
) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
    let (release, released) = oneshot::channel::<()>();
    let groups = groups.clone();
    let task = tokio::spawn(async move {
        let _turn = groups.turn().await;
        let _ = released.await;
    });
    (task, release)
}

#[tokio::test]
async fn accepts_go_ahead_of_writers_still_waiting() {
    let pool = pool().await;
    let groups = Arc::new(Groups::<sqlx::Sqlite>::taking_turns(None));
    let (mut first, release_first) = holder(&groups);
    assert!(still_waiting(&mut first).await, "the first holds the turn");
    let (mut second, release_second) = holder(&groups);
    let (third, release_third) = holder(&groups);
    assert!(still_waiting(&mut second).await);
    let mut accept = tokio::spawn({
        let (groups, pool) = (groups.clone(), pool.clone());
        async move { groups.accepts.join(&pool).await.unwrap().commit().await }
    });
    assert!(still_waiting(&mut accept).await, "the turn is held");

    // The second was already at the lock when the accept came, the third
    // behind it: the second lets the accept go first, and neither of
    // them holds the turn until the accept has committed.
    release_first.send(()).unwrap();
    first.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), accept)
        .await
        .expect("the accept went before the second and the third")
        .unwrap()
        .unwrap();
    assert!(
        still_waiting(&mut second).await,
        "the second holds the turn"
    );
    release_second.send(()).unwrap();
    second.await.unwrap();
    release_third.send(()).unwrap();
    third.await.unwrap();
}

#[tokio::test]
async fn a_delivery_group_commits_without_newcomers_while_an_accept_waits() {
    let pool = pool().await;
    let groups = Arc::new(Groups::<sqlx::Sqlite>::taking_turns(None));
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let commit = |name: &'static str, group: fn(&Groups<sqlx::Sqlite>) -> &Group<sqlx::Sqlite>| {
        let (groups, pool, done) = (groups.clone(), pool.clone(), done.clone());
        tokio::spawn(async move {
            group(&groups)
                .join(&pool)
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
            done.lock().unwrap().push(name);
        })
    };
    // A campaign's hand-over holds the group open; another queues to
    // join it, then an accept comes.
    let opener = groups.deliveries.join(&pool).await.unwrap();
    let mut newcomer = commit("newcomer", |groups| &groups.deliveries);
    assert!(still_waiting(&mut newcomer).await);
    let mut accept = commit("accept", |groups| &groups.accepts);
    assert!(still_waiting(&mut accept).await, "the turn is held");

    // The group commits with its opener alone; the accept goes next.
    opener.commit().await.unwrap();
    accept.await.unwrap();
    newcomer.await.unwrap();
    assert_eq!(*done.lock().unwrap(), ["accept", "newcomer"]);
}

#[tokio::test]
async fn postgres_writers_take_no_turn() {
    let groups = Groups::<sqlx::Postgres>::apart();
    assert!(groups.turn().await.is_none());
}
