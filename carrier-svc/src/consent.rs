//! Turning a subscriber record and a person's consent choices into the
//! profile the relay may store: only the chosen fields, at the chosen
//! granularity. This is the only place subscriber attributes leave the carrier.

use chukei_proto::carrier::v1::{AgeGranularity, ConsentChoices, RegionGranularity};
use chukei_proto::common::v1::ConsentedProfile;

use crate::model::Subscriber;

/// The version of [`consent_text`]: a person's choice is recorded with the
/// version they were shown, and a choice made on another version is refused.
pub const TEXT_VERSION: &str = "2026-11-27";

/// What the terminal shows before a person shares anything: exactly the
/// values the relay would store for `enterprise_id`, and their rights.
pub fn consent_text(enterprise_id: &str, profile: &ConsentedProfile) -> String {
    let mut shared = Vec::new();
    match chukei_proto::common::v1::Gender::try_from(profile.gender) {
        Ok(chukei_proto::common::v1::Gender::Unspecified) | Err(_) => {}
        Ok(gender) => shared.push(format!(
            "gender: {}",
            gender
                .as_str_name()
                .trim_start_matches("GENDER_")
                .to_lowercase()
        )),
    }
    if let (Some(min), Some(max)) = (profile.age_min, profile.age_max) {
        shared.push(if min == max {
            format!("age: {min}")
        } else {
            format!("age: {min}–{max}")
        });
    }
    if !profile.region.is_empty() {
        shared.push(format!("region: {}", profile.region));
    }
    if !profile.occupation.is_empty() {
        shared.push(format!("occupation: {}", profile.occupation));
    }
    let what = if shared.is_empty() {
        "nothing about you beyond your registration".to_owned()
    } else {
        shared.join("; ")
    };
    format!(
        "{enterprise_id} will be able to choose you for messages by: {what}. \
         It never sees these values, your number or your carrier. \
         You can change or withdraw this at any time; withdrawing deletes them at once."
    )
}

/// [`consent_text`] in Japanese (the same version: the same choices and rights).
pub fn consent_text_ja(enterprise_id: &str, profile: &ConsentedProfile) -> String {
    let mut shared = Vec::new();
    match chukei_proto::common::v1::Gender::try_from(profile.gender) {
        Ok(chukei_proto::common::v1::Gender::Female) => shared.push("性別: 女性".to_owned()),
        Ok(chukei_proto::common::v1::Gender::Male) => shared.push("性別: 男性".to_owned()),
        Ok(chukei_proto::common::v1::Gender::Other) => shared.push("性別: その他".to_owned()),
        _ => {}
    }
    if let (Some(min), Some(max)) = (profile.age_min, profile.age_max) {
        shared.push(if min == max {
            format!("年齢: {min}歳")
        } else {
            format!("年齢: {min}〜{max}歳")
        });
    }
    if !profile.region.is_empty() {
        shared.push(format!("地域: {}", profile.region));
    }
    if !profile.occupation.is_empty() {
        shared.push(format!("職業: {}", profile.occupation));
    }
    let what = if shared.is_empty() {
        "登録の事実以外は何も使いません".to_owned()
    } else {
        format!("{}によって", shared.join("、"))
    };
    format!(
        "{enterprise_id}は、{what}メッセージの送信先としてあなたを選べるようになります。\
         企業がこれらの値そのもの、電話番号、ご利用の通信会社を知ることはありません。\
         いつでも変更・撤回でき、撤回するとただちに削除されます。"
    )
}

/// Whole years between `birth_date` (`YYYY-MM-DD`) and the date of `now_ms`.
pub fn age_on(birth_date: &str, now_ms: i64) -> Option<u32> {
    let mut parts = birth_date.split('-').map(str::parse::<i64>);
    let (Some(Ok(year)), Some(Ok(month)), Some(Ok(day))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let (now_year, now_month, now_day) = civil_from_days(now_ms.div_euclid(86_400_000));
    let mut age = now_year - year;
    if (now_month, now_day) < (month, day) {
        age -= 1;
    }
    u32::try_from(age).ok()
}

/// Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The profile to share: only what `choices` allows.
pub fn consented_profile(
    subscriber: &Subscriber,
    choices: &ConsentChoices,
    now_ms: i64,
) -> ConsentedProfile {
    let mut profile = ConsentedProfile::default();
    if choices.gender {
        profile.gender = subscriber.gender;
    }
    if let Some(age) = age_on(&subscriber.birth_date, now_ms) {
        match AgeGranularity::try_from(choices.age) {
            Ok(AgeGranularity::Exact) => {
                profile.age_min = Some(age);
                profile.age_max = Some(age);
            }
            Ok(AgeGranularity::Decade) => {
                profile.age_min = Some(age / 10 * 10);
                profile.age_max = Some(age / 10 * 10 + 9);
            }
            _ => {}
        }
    }
    match RegionGranularity::try_from(choices.region) {
        Ok(RegionGranularity::City) => profile.region = subscriber.region.clone(),
        Ok(RegionGranularity::Prefecture) => {
            profile.region = subscriber
                .region
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
        }
        _ => {}
    }
    if choices.occupation {
        profile.occupation = subscriber.occupation.clone();
    }
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn subscriber() -> Subscriber {
        Subscriber {
            user_id: "u1".into(),
            phone_number: "+819000000000".into(),
            name: "Test".into(),
            gender: 1,
            birth_date: "1993-06-15".into(),
            region: "tokyo/shibuya".into(),
            occupation: "engineer".into(),
            primary: true,
            email: String::new(),
            sns_handle: String::new(),
        }
    }

    #[test]
    fn age_counts_whole_years_around_the_birthday() {
        // 2026-06-14 and 2026-06-15.
        let before = 20_618 * DAY;
        assert_eq!(civil_from_days(20_618), (2026, 6, 14));
        assert_eq!(age_on("1993-06-15", before), Some(32));
        assert_eq!(age_on("1993-06-15", before + DAY), Some(33));
        assert_eq!(age_on("not a date", before), None);
    }

    #[test]
    fn only_chosen_fields_leave_at_the_chosen_granularity() {
        let now = 20_619 * DAY;
        let choices = ConsentChoices {
            gender: false,
            age: AgeGranularity::Decade as i32,
            region: RegionGranularity::Prefecture as i32,
            occupation: false,
        };
        let profile = consented_profile(&subscriber(), &choices, now);
        assert_eq!(profile.gender, 0);
        assert_eq!((profile.age_min, profile.age_max), (Some(30), Some(39)));
        assert_eq!(profile.region, "tokyo");
        assert_eq!(profile.occupation, "");

        let nothing = consented_profile(&subscriber(), &ConsentChoices::default(), now);
        assert_eq!(nothing, ConsentedProfile::default());
    }
}
