//! Which database a test runs on: the backend matrix (`backend_tests!`),
//! fresh PostgreSQL databases, and a relay store of its own for tests below
//! the gRPC edge.

use sqlx::Connection;

use crate::*;

/// Which database the relay runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one `#[tokio::test]` per backend for an `async fn scenario(Backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario($crate::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario($crate::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// A temporary PostgreSQL database, or `None` when PostgreSQL tests are off.
pub async fn postgres_database() -> anyhow::Result<Option<(String, String)>> {
    let Ok(base) = std::env::var(POSTGRES_ENV) else {
        eprintln!("{POSTGRES_ENV} is not set: PostgreSQL variant skipped");
        return Ok(None);
    };
    let name = format!("chukei_t_{}", uuid::Uuid::now_v7().simple());
    let mut connection = sqlx::PgConnection::connect(&base).await.map_err(|error| {
        anyhow::anyhow!("{POSTGRES_ENV} is set but PostgreSQL is unreachable: {error}")
    })?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await?;
    connection.close().await?;
    let (prefix, _) = base
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("{POSTGRES_ENV}: expected postgres://…/database"))?;
    Ok(Some((format!("{prefix}/{name}"), name)))
}

pub async fn drop_postgres_database(name: &str) -> anyhow::Result<()> {
    let base = std::env::var(POSTGRES_ENV)?;
    let mut connection = sqlx::PgConnection::connect(&base).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut connection)
    .await?;
    Ok(())
}

/// A relay store of its own (a fresh SQLite file or PostgreSQL database),
/// for tests below the gRPC edge.
pub struct Fixture {
    pub store: relay_svc::storage::Store,
    postgres_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn close(self) {
        self.store.close().await;
        if let Some(name) = self.postgres_name {
            drop_postgres_database(&name).await.unwrap();
        }
    }
}

/// `None` when the backend is PostgreSQL and no test database is configured.
pub async fn store(backend: Backend) -> Option<Fixture> {
    let dir = tempfile::tempdir().unwrap();
    let (url, postgres_name) = match backend {
        Backend::Sqlite => (
            format!("sqlite://{}", dir.path().join("relay.db").display()),
            None,
        ),
        Backend::Postgres => {
            let (url, name) = postgres_database().await.unwrap()?;
            (url, Some(name))
        }
    };
    Some(Fixture {
        store: relay_svc::storage::Store::connect(&url).await.unwrap(),
        postgres_name,
        _dir: dir,
    })
}
