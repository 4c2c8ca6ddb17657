//! Evaluations of the hub's choices that anyone can rerun.
//!
//! `evaluate channels --campaigns 15 --users 2000` runs K campaigns against a
//! terminal-sim population whose hidden per-person channel preferences are
//! known to the simulator (`Fleet::assign_channel_preferences`), once per
//! strategy, each on a fresh hub (relay, carrier, terminals — the real
//! services, on one manual clock):
//!
//! - `fixed`: the enterprise's fixed channel (SMS) for everyone;
//! - `random`: a uniformly random channel per person and campaign;
//! - `adaptive`: the relay's `best` policy, learning from the opens;
//! - `oracle`: each person's true best channel.
//!
//! It prints the open rate (opened / delivered) of every campaign for each
//! strategy — the learning curve — with a summary, and writes the curve as
//! an SVG chart. Figures are printed, never asserted.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::rng::Rng;
use clap::{Parser, Subcommand, ValueEnum};
use integration_tests::scene::{HOUR_MS, MINUTE_MS, Scene, Setup, everyone, request, scene};
use integration_tests::{Backend, eventually, machine};
use terminal_sim::fleet::Fleet;

#[derive(Parser, Debug)]
#[command(name = "evaluate", version)]
struct Args {
    #[command(subcommand)]
    evaluation: Evaluation,
}

#[derive(Subcommand, Debug)]
enum Evaluation {
    /// Channel choice: fixed vs random vs adaptive (`best`) vs oracle.
    Channels {
        #[arg(long, default_value_t = 15)]
        campaigns: usize,
        #[arg(long, default_value_t = 2000)]
        users: usize,
        /// PostgreSQL needs CHUKEI_TEST_DATABASE_URL (a database is created and dropped).
        #[arg(long, value_enum, default_value = "sqlite")]
        backend: BackendArg,
        /// Where the learning-curve chart goes.
        #[arg(long, default_value = "docs/intelligence-channels.svg")]
        chart: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Fixed,
    Random,
    Adaptive,
    Oracle,
}

impl Strategy {
    const ALL: [Self; 4] = [Self::Fixed, Self::Random, Self::Adaptive, Self::Oracle];

    fn name(self) -> &'static str {
        match self {
            Self::Fixed => "fixed (SMS)",
            Self::Random => "random",
            Self::Adaptive => "adaptive (best)",
            Self::Oracle => "oracle",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Self::Fixed => "#888888",
            Self::Random => "#c9a227",
            Self::Adaptive => "#1f6fd1",
            Self::Oracle => "#2e9d4f",
        }
    }
}

const CHANNELS: [common::Channel; 4] = [
    common::Channel::Rcs,
    common::Channel::Sms,
    common::Channel::Sns,
    common::Channel::Email,
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        evaluation:
            Evaluation::Channels {
                campaigns,
                users,
                backend,
                chart,
            },
    } = chukei_proto::server::parse_args::<Args>();
    let backend = match backend {
        BackendArg::Sqlite => Backend::Sqlite,
        BackendArg::Postgres => Backend::Postgres,
    };
    println!("machine: {}", machine());
    println!(
        "channel choice: {campaigns} campaigns to {users} people with hidden channel preferences, {backend:?}"
    );
    let mut curves: Vec<(Strategy, Vec<f64>)> = Vec::new();
    for strategy in Strategy::ALL {
        let curve = run(strategy, backend, users, campaigns).await?;
        curves.push((strategy, curve));
    }

    print!("{:>8}", "campaign");
    for (strategy, _) in &curves {
        print!(" {:>16}", strategy.name());
    }
    println!(" {:>16}", "adaptive/oracle");
    for campaign in 0..campaigns {
        print!("{:>8}", campaign + 1);
        for (_, curve) in &curves {
            print!(" {:>15.1}%", 100.0 * curve[campaign]);
        }
        let ratio = curve_of(&curves, Strategy::Adaptive)[campaign]
            / curve_of(&curves, Strategy::Oracle)[campaign];
        println!(" {:>15.1}%", 100.0 * ratio);
    }
    let mean = |strategy: Strategy, from: usize| {
        let curve = curve_of(&curves, strategy);
        let tail = &curve[from.min(curve.len() - 1)..];
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let late = campaigns.saturating_sub(5);
    println!("mean open rate over campaigns {}..{campaigns}:", late + 1);
    for strategy in Strategy::ALL {
        println!(
            "  {:<16} {:.1}%",
            strategy.name(),
            100.0 * mean(strategy, late)
        );
    }
    let at_ten = campaigns.min(10) - 1;
    println!(
        "adaptive at campaign {}: {:.1}% of oracle; over the last five campaigns {:.2}x fixed, {:.1}% of oracle",
        at_ten + 1,
        100.0 * curve_of(&curves, Strategy::Adaptive)[at_ten]
            / curve_of(&curves, Strategy::Oracle)[at_ten],
        mean(Strategy::Adaptive, late) / mean(Strategy::Fixed, late),
        100.0 * mean(Strategy::Adaptive, late) / mean(Strategy::Oracle, late),
    );
    std::fs::write(&chart, svg(&curves, users))?;
    println!("chart: {chart}");
    Ok(())
}

fn curve_of(curves: &[(Strategy, Vec<f64>)], strategy: Strategy) -> &[f64] {
    &curves
        .iter()
        .find(|(s, _)| *s == strategy)
        .expect("every strategy ran")
        .1
}

/// One strategy's learning curve: the open rate of each campaign.
async fn run(
    strategy: Strategy,
    backend: Backend,
    users: usize,
    campaigns: usize,
) -> anyhow::Result<Vec<f64>> {
    let Some(scene) = scene(
        backend,
        Setup {
            users,
            tailor: Fleet::assign_channel_preferences,
            ..Setup::default()
        },
    )
    .await
    else {
        anyhow::bail!("PostgreSQL needs CHUKEI_TEST_DATABASE_URL");
    };
    let mut curve = Vec::with_capacity(campaigns);
    let (mut delivered_so_far, mut opened_so_far) = (0, 0);
    for campaign in 0..campaigns {
        let opened_before = scene.terminals.snapshot().opened;
        let ids = send(&scene, strategy, campaign).await;
        let mut delivered = 0;
        for id in &ids {
            let status = scene
                .wait(0, id, |s| s.matched > 0 && s.delivered == s.matched)
                .await;
            delivered += status.delivered;
        }
        // Everyone is active all day: opens come within the hour.
        scene.advance(61 * MINUTE_MS);
        let opened = opens_settled(&scene, &ids, opened_before).await;
        curve.push(opened as f64 / delivered.max(1) as f64);
        // The next campaign decides on everything seen so far.
        delivered_so_far += delivered;
        opened_so_far += opened;
        scene
            .wait_for_stats(0, delivered_so_far, opened_so_far)
            .await;
        eprintln!(
            "{}: campaign {} opened {opened} of {delivered}",
            strategy.name(),
            campaign + 1
        );
        scene.advance(11 * HOUR_MS);
    }
    scene.hub.shutdown().await?;
    Ok(curve)
}

/// Sends one campaign under `strategy`; returns its message ids.
async fn send(scene: &Scene, strategy: Strategy, campaign: usize) -> Vec<String> {
    let key = format!("campaign-{campaign}");
    let requests = match strategy {
        Strategy::Fixed => vec![pb::SendMessageRequest {
            channel: common::Channel::Sms as i32,
            ..everyone(&key, "this week's news")
        }],
        Strategy::Adaptive => vec![pb::SendMessageRequest {
            policy: Some(pb::DeliveryPolicy {
                kind: pb::PolicyKind::Best as i32,
                channels: CHANNELS.iter().map(|c| *c as i32).collect(),
                ..Default::default()
            }),
            ..everyone(&key, "this week's news")
        }],
        Strategy::Random | Strategy::Oracle => {
            let mut groups: HashMap<i32, Vec<String>> = HashMap::new();
            for (index, user) in scene.fleet.users.iter().enumerate() {
                let channel = if strategy == Strategy::Oracle {
                    user.best_channel()
                } else {
                    let mut rng =
                        Rng::for_labels(scene.fleet.seed, &["random-channel", &key, &user.user_id]);
                    *rng.pick(&CHANNELS) as i32
                };
                groups
                    .entry(channel)
                    .or_default()
                    .push(scene.ref_of(0, index));
            }
            groups
                .into_iter()
                .map(|(channel, refs)| pb::SendMessageRequest {
                    channel,
                    ..request(
                        &format!("{key}-{channel}"),
                        pb::target::Kind::Refs(pb::RefList { refs }),
                        "this week's news",
                    )
                })
                .collect()
        }
    };
    let mut ids = Vec::new();
    for request in requests {
        ids.push(scene.send(0, request).await);
    }
    ids
}

/// The campaign's opens once the relay has counted every open the terminals made.
async fn opens_settled(scene: &Scene, ids: &[String], opened_before: u64) -> u64 {
    let mut last = u64::MAX;
    eventually("opens settled", Duration::from_secs(120), || {
        let at_terminals = scene.terminals.snapshot().opened - opened_before;
        let counted = async {
            let mut counted = 0;
            for id in ids {
                counted += scene.status(0, id).await.opened;
            }
            counted
        };
        let stable = at_terminals == last;
        last = at_terminals;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let counted = counted.await;
            (stable && counted == at_terminals).then_some(counted)
        }
    })
    .await
}

/// The learning curves as a line chart.
fn svg(curves: &[(Strategy, Vec<f64>)], users: usize) -> String {
    let (width, height) = (720.0, 420.0);
    let (left, right, top, bottom) = (60.0, 180.0, 40.0, 50.0);
    let campaigns = curves[0].1.len().max(2);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let x = |i: usize| left + plot_w * i as f64 / (campaigns - 1) as f64;
    let y = |rate: f64| top + plot_h * (1.0 - rate.clamp(0.0, 1.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/><text x="{left}" y="24" font-size="14">Open rate per campaign, {users} people with hidden channel preferences</text>"#
    );
    for tick in 0..=10 {
        let rate = tick as f64 / 10.0;
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#eeeeee"/><text x="{}" y="{:.1}" text-anchor="end">{}%</text>"##,
            left + plot_w,
            left - 6.0,
            y(rate) + 4.0,
            tick * 10,
            y0 = y(rate),
        );
    }
    for campaign in 0..campaigns {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(campaign),
            top + plot_h + 18.0,
            campaign + 1
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">campaign</text>"#,
        left + plot_w / 2.0,
        height - 8.0
    );
    for (row, (strategy, curve)) in curves.iter().enumerate() {
        let points: Vec<String> = curve
            .iter()
            .enumerate()
            .map(|(i, rate)| format!("{:.1},{:.1}", x(i), y(*rate)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            strategy.colour(),
            points.join(" ")
        );
        let ly = top + 20.0 * row as f64 + 10.0;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            left + plot_w + 16.0,
            left + plot_w + 40.0,
            strategy.colour(),
            left + plot_w + 46.0,
            ly + 4.0,
            strategy.name()
        );
    }
    out.push_str("</svg>\n");
    out
}
