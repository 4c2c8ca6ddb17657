//! Open-rate bar charts as SVG, drawn on the server: one bar per group with
//! its 95% interval as a whisker. Each chart sits beside a table of the same
//! numbers (what a screen reader reads).

use std::fmt::Write;

use crate::stats::Estimate;

/// One bar: a group's open rate and its interval, or no bar (nothing delivered).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Bar {
    pub(super) label: String,
    pub(super) rate: Option<Estimate>,
}

const HEIGHT: f64 = 160.0;
const TOP: f64 = 10.0;
const LEFT: f64 = 36.0;
const BOTTOM: f64 = 28.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart of `bars` titled `title` (its accessible name).
pub(super) fn open_rates(title: &str, bars: &[Bar]) -> String {
    let slot = if bars.len() > 12 { 24.0 } else { 60.0 };
    let width = LEFT + slot * bars.len().max(1) as f64 + 10.0;
    let total = TOP + HEIGHT + BOTTOM;
    let y = |rate: f64| TOP + HEIGHT * (1.0 - rate.clamp(0.0, 1.0));
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" width="{width:.0}" height="{total:.0}" viewBox="0 0 {width:.0} {total:.0}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        escape(title)
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{width:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#c4c4c4" stroke-width="1"/><text x="{x:.0}" y="{ty:.1}" text-anchor="end">{pct:.0}%</text>"##,
            y = y(tick),
            x = LEFT - 4.0,
            ty = y(tick) + 4.0,
            pct = tick * 100.0
        );
    }
    for (i, bar) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64;
        let label = escape(&bar.label);
        if let Some(Estimate { rate, low, high }) = bar.rate {
            let top = y(rate);
            let _ = write!(
                svg,
                r##"<rect class="funnel-bar" x="{bx:.1}" y="{top:.1}" width="{bw:.1}" height="{h:.1}"><title>{label}: {pct:.1}% ({lo:.1}–{hi:.1}%)</title></rect><line x1="{cx:.1}" x2="{cx:.1}" y1="{yl:.1}" y2="{yh:.1}" stroke="#c75b00" stroke-width="2"/>"##,
                bx = x + slot * 0.15,
                bw = slot * 0.7,
                h = TOP + HEIGHT - top,
                pct = rate * 100.0,
                lo = low * 100.0,
                hi = high * 100.0,
                cx = x + slot * 0.5,
                yl = y(low),
                yh = y(high),
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{cx:.1}" y="{ly:.1}" text-anchor="middle">{label}</text>"#,
            cx = x + slot * 0.5,
            ly = TOP + HEIGHT + 16.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_drawn_to_scale_with_their_interval_and_labels_escaped() {
        let svg = open_rates(
            "Open rate by channel",
            &[
                Bar {
                    label: "sms".into(),
                    rate: Some(Estimate {
                        rate: 0.5,
                        low: 0.4,
                        high: 0.6,
                    }),
                },
                Bar {
                    label: "<rcs>".into(),
                    rate: None,
                },
            ],
        );
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains(r#"aria-label="Open rate by channel""#));
        // Half of the 160-unit plot above a 10-unit margin: the bar's top at 90.
        assert!(
            svg.contains(r#"y="90.0" width="42.0" height="80.0""#),
            "{svg}"
        );
        assert!(svg.contains("sms: 50.0% (40.0–60.0%)"));
        assert_eq!(svg.matches("<rect").count(), 1);
        assert!(svg.contains("&lt;rcs&gt;") && !svg.contains("<rcs>"));
    }
}
