//! What the consent page's templates are given: one struct per page, and
//! profiles and choices put into words.

use askama::Template;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::common::v1::{ConsentedProfile, Gender};

use super::Page;
use super::text::Text;

#[derive(Template)]
#[template(path = "consent/sign_in.html")]
pub(super) struct SignInPage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) error: Option<&'static str>,
}

impl SignInPage {
    pub(super) fn new(
        t: &'static Text,
        page: &Page,
        visit: &str,
        error: Option<&'static str>,
    ) -> Self {
        Self {
            t,
            signed_in: false,
            sign_out: false,
            csrf: page.signer.csrf(visit),
            error,
        }
    }
}

#[derive(Template)]
#[template(path = "consent/code.html")]
pub(super) struct CodePage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) error: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "consent/message.html")]
pub(super) struct MessagePage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) title: &'static str,
    pub(super) class: &'static str,
    pub(super) text: &'static str,
}

pub(super) struct EnterpriseRow {
    pub(super) enterprise_id: String,
    pub(super) name: String,
    pub(super) shared: String,
    pub(super) updated: String,
}

#[derive(Template)]
#[template(path = "consent/home.html")]
pub(super) struct HomePage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) notice: Option<&'static str>,
    pub(super) rows: Vec<EnterpriseRow>,
}

/// A person's choices as the form shows them.
#[derive(Clone, Copy, Debug)]
pub(super) struct ChoiceView {
    pub(super) gender: bool,
    pub(super) age: &'static str,
    pub(super) region: &'static str,
    pub(super) occupation: bool,
}

impl ChoiceView {
    pub(super) fn of(choices: &pb::ConsentChoices) -> Self {
        Self {
            gender: choices.gender,
            age: match pb::AgeGranularity::try_from(choices.age) {
                Ok(pb::AgeGranularity::Exact) => "exact",
                Ok(pb::AgeGranularity::Decade) => "decade",
                _ => "none",
            },
            region: match pb::RegionGranularity::try_from(choices.region) {
                Ok(pb::RegionGranularity::City) => "city",
                Ok(pb::RegionGranularity::Prefecture) => "prefecture",
                _ => "none",
            },
            occupation: choices.occupation,
        }
    }
}

#[derive(Template)]
#[template(path = "consent/enterprise.html")]
pub(super) struct EnterprisePage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) notice: Option<&'static str>,
    pub(super) enterprise_id: String,
    pub(super) name: String,
    pub(super) profile: Vec<(&'static str, String)>,
    pub(super) choices: ChoiceView,
    pub(super) text_version: &'static str,
}

#[derive(Template)]
#[template(path = "consent/preview.html")]
pub(super) struct PreviewPage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) enterprise_id: String,
    pub(super) name: String,
    pub(super) profile: Vec<(&'static str, String)>,
    pub(super) consent_text: String,
    pub(super) text_version: String,
    pub(super) choices: ChoiceView,
}

pub(super) struct HistoryView {
    pub(super) at: String,
    pub(super) enterprise: String,
    pub(super) action: &'static str,
    pub(super) shared: String,
}

#[derive(Template)]
#[template(path = "consent/history.html")]
pub(super) struct HistoryPage {
    pub(super) t: &'static Text,
    pub(super) signed_in: bool,
    pub(super) sign_out: bool,
    pub(super) csrf: String,
    pub(super) rows: Vec<HistoryView>,
}

/// The exact values a profile holds, labelled for people.
pub(super) fn profile_rows(
    t: &'static Text,
    profile: &ConsentedProfile,
) -> Vec<(&'static str, String)> {
    let mut rows = Vec::new();
    match Gender::try_from(profile.gender) {
        Ok(Gender::Female) => rows.push((t.gender, t.female.to_owned())),
        Ok(Gender::Male) => rows.push((t.gender, t.male.to_owned())),
        Ok(Gender::Other) => rows.push((t.gender, t.other.to_owned())),
        _ => {}
    }
    if let (Some(min), Some(max)) = (profile.age_min, profile.age_max) {
        rows.push((
            t.age,
            if min == max {
                min.to_string()
            } else {
                format!("{min}–{max}")
            },
        ));
    }
    if !profile.region.is_empty() {
        rows.push((t.region, profile.region.clone()));
    }
    if !profile.occupation.is_empty() {
        rows.push((t.occupation, profile.occupation.clone()));
    }
    rows
}

pub(super) fn summary(t: &'static Text, profile: &ConsentedProfile) -> String {
    let rows = profile_rows(t, profile);
    if rows.is_empty() {
        return t.nothing_shared.to_owned();
    }
    rows.iter()
        .map(|(label, value)| format!("{label}: {value}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// What a choice shares, in words (not values: the history shows what was
/// chosen, whatever the subscriber record holds today).
pub(super) fn choices_in_words(t: &'static Text, choices: &pb::ConsentChoices) -> String {
    let view = ChoiceView::of(choices);
    let mut words = Vec::new();
    if view.gender {
        words.push(t.gender.to_owned());
    }
    match view.age {
        "exact" => words.push(t.age_exact.to_owned()),
        "decade" => words.push(t.age_decade.to_owned()),
        _ => {}
    }
    match view.region {
        "city" => words.push(t.region_city.to_owned()),
        "prefecture" => words.push(t.region_prefecture.to_owned()),
        _ => {}
    }
    if view.occupation {
        words.push(t.occupation.to_owned());
    }
    if words.is_empty() {
        t.nothing_shared.to_owned()
    } else {
        words.join(" · ")
    }
}
