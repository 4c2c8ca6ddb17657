//! The services as real processes: finding the built binaries, free loopback
//! ports, and children that stop on SIGTERM within a deadline (and are killed
//! if their owner goes away first). Used by the smoke tests and the local run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// A loopback port nobody listens on right now, for a server started on a
/// port chosen beforehand (a child process, a peer, a relay restarted on
/// the same address). It is taken below the kernel's ephemeral range, so no
/// listener bound to port 0 (the in-process hub's) and no outgoing
/// connection can be given it between this check and the server's own
/// bind — which happened once to a port taken from `bind(0)`. Successive
/// calls, and concurrent test processes (by their pid), start from
/// different ports.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    // Half the ports below the ephemeral range, clear of the well-known ones.
    let low = (ephemeral / 2).max(1_024);
    let span = ephemeral.saturating_sub(low).max(1);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let port = low + start.wrapping_add(call.wrapping_mul(13)) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The binary `name` in `dir`, or an error saying how to build it.
pub fn binary_in(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        anyhow::bail!(
            "{} not found: build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The workspace binary `name` beside the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn test_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    binary_in(dir, name)
}

/// A child process, killed if dropped before it was terminated.
pub struct Process {
    name: String,
    child: Option<Child>,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .map_err(|error| anyhow::anyhow!("could not start {name}: {error}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// A child started elsewhere (to read its output), killed if dropped.
    pub fn adopt(name: &str, child: Child) -> Self {
        Self {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has ended by itself.
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// SIGKILL, and waits until it is gone.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then its exit status; killed and an error after `grace`.
    pub fn terminate(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            anyhow::bail!("{} was already stopped", self.name);
        };
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "{} did not stop within {grace:?} of SIGTERM; killed",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
