//! Servers that are not ours, run as Python processes from `tests/python/`
//! (a scripted SMSC, a mail server, Jasmin), and what the tests read back
//! from what they record.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::eventually;
use crate::process::Process;

/// Names the Python the helper servers run on (with `aiosmtpd`, as
/// `.ci/run` installs); without it the tests that need one say so and skip.
pub const PYTHON_ENV: &str = "CHUKEI_TEST_PYTHON";

/// The Python of [`PYTHON_ENV`], or `None` (said on stderr) when unset.
pub fn python(what: &str) -> Option<PathBuf> {
    let python = std::env::var_os(PYTHON_ENV).map(PathBuf::from);
    if python.is_none() {
        eprintln!("{PYTHON_ENV} unset: {what} skipped");
    }
    python
}

/// The helper `script` from `tests/python`, started with `args`.
pub fn helper(python: &Path, script: &str, args: &[String]) -> Process {
    let path = format!("{}/python/{script}", env!("CARGO_MANIFEST_DIR"));
    Process::spawn(
        script,
        Command::new(python)
            .arg(path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
    .unwrap()
}

/// Waits until something accepts connections on `port`.
pub async fn listening(port: u16, within: Duration) {
    eventually("the server listens", within, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            .then_some(())
    })
    .await;
}

/// The JSON lines a helper recorded so far.
pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The texts an SMSC recorded (`tests/python/smsc.py`) for each number,
/// each put back together from its parts by their concatenation header
/// (reference, total, number).
pub fn texts_by_number(record: &Path) -> HashMap<String, Vec<String>> {
    let mut whole: HashMap<String, Vec<String>> = HashMap::new();
    let mut parts: BTreeMap<(String, u64, u64), BTreeMap<u64, String>> = BTreeMap::new();
    for line in lines(record) {
        let number = line["destination"].as_str().unwrap().to_owned();
        let text = line["text"].as_str().unwrap().to_owned();
        match line["udh"].as_array() {
            None => whole.entry(number).or_default().push(text),
            Some(udh) => {
                let key = (number, udh[0].as_u64().unwrap(), udh[1].as_u64().unwrap());
                let total = key.2;
                let of_message = parts.entry(key.clone()).or_default();
                of_message.insert(udh[2].as_u64().unwrap(), text);
                if of_message.len() as u64 == total {
                    let text: String = of_message.values().cloned().collect();
                    parts.remove(&key);
                    whole.entry(key.0).or_default().push(text);
                }
            }
        }
    }
    whole
}

/// Jasmin (`tests/python/jasmin.py`): its root under `root`, its SMPP
/// server on `smpp_port`, `connectors` client connectors to the SMSC on
/// `smsc_port`; returns once every connector is provisioned.
pub async fn start_jasmin(
    python: &Path,
    jasmind: &Path,
    root: &Path,
    smpp_port: u16,
    smsc_port: u16,
    connectors: usize,
) -> anyhow::Result<Process> {
    use std::io::{BufRead, BufReader};
    std::fs::create_dir_all(root)?;
    let mut child = Command::new(python)
        .arg(format!("{}/python/jasmin.py", env!("CARGO_MANIFEST_DIR")))
        .arg("--jasmind")
        .arg(jasmind)
        .arg("--root")
        .arg(root)
        .args(["--smpp-port", &smpp_port.to_string()])
        .args(["--smsc-port", &smsc_port.to_string()])
        .args(["--connectors", &connectors.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let jasmin = Process::adopt("jasmin.py", child);
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "ready")
    });
    let ready = tokio::time::timeout(Duration::from_secs(180), ready).await;
    anyhow::ensure!(
        matches!(ready, Ok(Ok(true))),
        "Jasmin did not come up within 3 minutes (see {}/jasmind.out)",
        root.display()
    );
    Ok(jasmin)
}
