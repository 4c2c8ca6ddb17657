//! `enterprise-cli send --from-file FILE`: one message per line of a CSV or
//! JSON-lines file (a personalised text per person), sent over one
//! `SendMessages` stream, with a progress line and a result per line in a
//! JSON-lines file. The other `send` options are the template every line
//! starts from; a line gives its ref(s), its text and optionally its
//! idempotency key, subject and channel.
//!
//! Each line's idempotency key defaults to `<file name>:<line number>`, so
//! running the same file again sends nothing twice: what was accepted is
//! answered again with the same message id.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chukei_proto::relay::v1 as pb;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use crate::output::state_name;
use crate::request::parse_channel;
use crate::{Client, SendArgs, explain, send_request};

/// One line's own fields.
#[derive(Debug, Default, PartialEq, Eq)]
struct Line {
    refs: Vec<String>,
    text: String,
    idempotency_key: Option<String>,
    subject: Option<String>,
    channel: Option<String>,
}

/// Reads `FILE` (CSV with a header row, or JSON lines), sends a message per
/// line and writes each line's outcome to the results file.
pub(crate) async fn send_file(
    client: &mut Client,
    args: &SendArgs,
    file: &Path,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| anyhow::anyhow!("--from-file {}: {error}", file.display()))?;
    let lines = parse(file, &text);
    let results_path = args.results.clone().unwrap_or_else(|| {
        let mut name = file.as_os_str().to_owned();
        name.push(".results.jsonl");
        PathBuf::from(name)
    });
    let mut results = std::io::BufWriter::new(
        std::fs::File::create(&results_path)
            .map_err(|error| anyhow::anyhow!("--results {}: {error}", results_path.display()))?,
    );
    // The template: every option but the target and the text, from the command line.
    let mut template_args = args.clone();
    template_args.refs = vec!["-".into()];
    template_args.text = Some(String::new());
    let template = send_request(&template_args)?;
    let prefix = file
        .file_name()
        .map_or_else(|| "line".into(), |name| name.to_string_lossy().into_owned());

    let total = lines.len();
    let (requests, requests_rx) = tokio::sync::mpsc::channel(256);
    let mut sent_lines: Vec<(usize, String)> = Vec::new();
    let mut refused = 0_usize;
    let mut accepted = 0_usize;
    for (number, line) in &lines {
        if let Err(error) = line {
            refused += 1;
            writeln!(
                results,
                "{}",
                json!({"line": number, "refused": {"code": "InvalidArgument", "message": error}})
            )?;
        }
    }
    let mut requests_to_send = Vec::new();
    for (number, line) in lines {
        let Ok(line) = line else { continue };
        let mut request = template.clone();
        let key = line
            .idempotency_key
            .unwrap_or_else(|| format!("{prefix}:{number}"));
        request.idempotency_key = key.clone();
        request.target = Some(pb::Target {
            kind: Some(pb::target::Kind::Refs(pb::RefList { refs: line.refs })),
        });
        let content = request.content.get_or_insert_with(Default::default);
        content.text = line.text;
        if let Some(subject) = line.subject {
            content.subject = subject;
        }
        if let Some(channel) = &line.channel {
            match parse_channel("channel", channel) {
                Ok(channel) => request.channel = channel as i32,
                Err(error) => {
                    refused += 1;
                    writeln!(
                        results,
                        "{}",
                        json!({"line": number, "idempotency_key": key, "refused": {"code": "InvalidArgument", "message": error.to_string()}})
                    )?;
                    continue;
                }
            }
        }
        sent_lines.push((number, key));
        requests_to_send.push(request);
    }
    let feeder = tokio::spawn(async move {
        for request in requests_to_send {
            if requests.send(request).await.is_err() {
                break;
            }
        }
    });
    let mut stream = client
        .send_messages(ReceiverStream::new(requests_rx))
        .await
        .map_err(explain)?
        .into_inner();
    let mut progress = Progress::new(total);
    let mut answered: HashSet<u64> = HashSet::new();
    while let Some(result) = stream.message().await.map_err(explain)? {
        let Some((number, key)) = sent_lines.get(result.index as usize) else {
            continue;
        };
        answered.insert(result.index);
        let record = match result.outcome {
            Some(pb::send_messages_result::Outcome::Accepted(response)) => {
                accepted += 1;
                json!({
                    "line": number,
                    "idempotency_key": key,
                    "message_id": response.message_id,
                    "state": state_name(response.state),
                    "matched": response.matched,
                })
            }
            Some(pb::send_messages_result::Outcome::Refused(refusal)) => {
                refused += 1;
                json!({
                    "line": number,
                    "idempotency_key": key,
                    "refused": {
                        "code": format!("{:?}", tonic::Code::from(refusal.code)),
                        "message": refusal.message,
                    },
                })
            }
            None => continue,
        };
        writeln!(results, "{record}")?;
        progress.show(accepted + refused, refused);
    }
    feeder.await?;
    results.flush()?;
    progress.finish(accepted + refused, refused);
    let unanswered = sent_lines.len() - answered.len();
    writeln!(
        out,
        "{total} lines: {accepted} accepted, {refused} refused{}; results in {}",
        if unanswered > 0 {
            format!(
                ", {unanswered} unanswered (send the file again: accepted lines are not sent twice)"
            )
        } else {
            String::new()
        },
        results_path.display()
    )?;
    if unanswered > 0 {
        anyhow::bail!("the relay ended the stream with {unanswered} lines unanswered");
    }
    Ok(())
}

/// A progress line on stderr, at most every 200 ms (and once at the end).
struct Progress {
    total: usize,
    shown: Instant,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            shown: Instant::now(),
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    fn show(&mut self, done: usize, refused: usize) {
        if self.shown.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.shown = Instant::now();
        self.line(done, refused);
    }

    fn line(&self, done: usize, refused: usize) {
        let percent = 100.0 * done as f64 / self.total.max(1) as f64;
        let text = format!(
            "sent {done} of {} lines ({percent:.0} %), {refused} refused",
            self.total
        );
        if self.terminal {
            eprint!("\r{text}");
        } else {
            eprintln!("{text}");
        }
    }

    fn finish(&self, done: usize, refused: usize) {
        self.line(done, refused);
        if self.terminal {
            eprintln!();
        }
    }
}

/// The file's lines (numbered from 1, the CSV header counted) with their
/// fields, or why a line cannot be sent.
fn parse(file: &Path, text: &str) -> Vec<(usize, Result<Line, String>)> {
    let json = file
        .extension()
        .is_some_and(|ext| ext == "jsonl" || ext == "json" || ext == "ndjson")
        || text.trim_start().starts_with('{');
    if json {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| (i + 1, json_line(line)))
            .collect()
    } else {
        csv_lines(text)
    }
}

fn json_line(line: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(line).map_err(|error| format!("not JSON: {error}"))?;
    let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
    let refs = match (value.get("refs"), field("ref")) {
        (Some(Value::Array(refs)), _) => refs
            .iter()
            .map(|r| r.as_str().map(str::to_owned).ok_or("refs: must be strings"))
            .collect::<Result<Vec<_>, _>>()?,
        (_, Some(one)) => vec![one],
        _ => return Err("ref: missing (or refs: [...])".into()),
    };
    checked(Line {
        refs,
        text: field("text").ok_or("text: missing")?,
        idempotency_key: field("idempotency_key"),
        subject: field("subject"),
        channel: field("channel"),
    })
}

fn csv_lines(text: &str) -> Vec<(usize, Result<Line, String>)> {
    let mut rows = text.lines().enumerate();
    let Some((_, header)) = rows.next() else {
        return Vec::new();
    };
    let columns: Vec<String> = csv_fields(header)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    rows.filter(|(_, row)| !row.trim().is_empty())
        .map(|(i, row)| {
            let line = csv_fields(row).and_then(|fields| {
                if fields.len() != columns.len() {
                    return Err(format!(
                        "{} fields for {} columns",
                        fields.len(),
                        columns.len()
                    ));
                }
                let get = |name: &str| {
                    columns
                        .iter()
                        .position(|c| c == name)
                        .map(|at| fields[at].clone())
                        .filter(|v| !v.is_empty())
                };
                checked(Line {
                    refs: get("ref")
                        .or_else(|| get("refs"))
                        .map(|refs| refs.split_whitespace().map(str::to_owned).collect())
                        .ok_or("ref: missing")?,
                    text: get("text").ok_or("text: missing")?,
                    idempotency_key: get("idempotency_key"),
                    subject: get("subject"),
                    channel: get("channel"),
                })
            });
            (i + 1, line)
        })
        .collect()
}

fn checked(line: Line) -> Result<Line, String> {
    if line.refs.is_empty() || line.refs.iter().any(|r| r.trim().is_empty()) {
        return Err("ref: must not be empty".into());
    }
    Ok(line)
}

/// One CSV row's fields (RFC 4180: commas, double quotes, "" for a quote).
fn csv_fields(row: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = row.trim_end_matches('\r').chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    if quoted {
        return Err("an unterminated quote".into());
    }
    fields.push(field);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json_lines_give_the_same_lines_and_name_what_is_wrong() {
        let csv = "ref,text,idempotency_key\nr1,\"Hello, \"\"Aiko\"\"\",k1\nr2,Hi,\n\nr3,\n";
        let lines = parse(Path::new("f.csv"), csv);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            (
                2,
                Ok(Line {
                    refs: vec!["r1".into()],
                    text: "Hello, \"Aiko\"".into(),
                    idempotency_key: Some("k1".into()),
                    ..Line::default()
                })
            )
        );
        assert_eq!(lines[1].1.as_ref().unwrap().idempotency_key, None);
        assert_eq!(lines[2], (5, Err("2 fields for 3 columns".into())));

        let jsonl = "{\"ref\":\"r1\",\"text\":\"Hello\",\"channel\":\"sms\"}\n{\"refs\":[\"a\",\"b\"],\"text\":\"x\"}\n{\"text\":\"no ref\"}\nnot json\n";
        let lines = parse(Path::new("f.jsonl"), jsonl);
        assert_eq!(lines[0].1.as_ref().unwrap().channel.as_deref(), Some("sms"));
        assert_eq!(lines[1].1.as_ref().unwrap().refs, ["a", "b"]);
        assert_eq!(lines[2].1, Err("ref: missing (or refs: [...])".into()));
        assert!(lines[3].1.as_ref().unwrap_err().starts_with("not JSON"));
    }
}
