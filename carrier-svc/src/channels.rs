//! Channel adapters: how the carrier turns a delivery into what each channel
//! really carries, with that channel's constraints.
//!
//! - SMS: the text split into segments — GSM 03.38 (7-bit) text takes 160
//!   characters in a single message and 153 per part once concatenated (the
//!   user data header takes 7); anything outside the GSM alphabet forces UCS-2:
//!   70 alone, 67 per part, counted in UTF-16 units. A part never splits a
//!   surrogate pair, nor a GSM escape pair (`€`, `[`, …, which take two septets).
//!   Media and suggested replies are not carried.
//! - RCS: a rich card — text, optional media, suggested replies.
//! - E-mail: subject and body to the subscriber's address; none on file makes
//!   the channel unsupported for that person.
//! - SNS: the text to the subscriber's handle; none on file, unsupported.

use crate::model::{CHANNEL_EMAIL, CHANNEL_RCS, CHANNEL_SMS, CHANNEL_SNS};

/// What a delivery looks like on its channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// SMS only: the parts, in order.
    pub sms_segments: Vec<String>,
    /// E-mail address or SNS handle.
    pub address: String,
    /// Media and suggested replies survive only on RCS (and media on e-mail).
    pub media_url: String,
    pub subject: String,
    pub suggested_replies: Vec<String>,
}

pub use crate::model::Contact;

/// Why the carrier cannot use a channel for a person.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    NoEmailAddress,
    NoSnsHandle,
    UnknownChannel,
}

/// Renders one delivery for `channel`.
pub fn render(
    channel: i64,
    text: &str,
    media_url: &str,
    subject: &str,
    suggested_replies: &[String],
    contact: &Contact,
) -> Result<Rendered, Unsupported> {
    let plain = |address: &str| Rendered {
        sms_segments: Vec::new(),
        address: address.to_owned(),
        media_url: String::new(),
        subject: String::new(),
        suggested_replies: Vec::new(),
    };
    match channel {
        CHANNEL_SMS => Ok(Rendered {
            sms_segments: sms_segments(text),
            ..plain("")
        }),
        CHANNEL_RCS => Ok(Rendered {
            media_url: media_url.to_owned(),
            suggested_replies: suggested_replies.to_vec(),
            ..plain("")
        }),
        CHANNEL_EMAIL if contact.email.is_empty() => Err(Unsupported::NoEmailAddress),
        CHANNEL_EMAIL => Ok(Rendered {
            media_url: media_url.to_owned(),
            subject: if subject.is_empty() {
                first_words(text)
            } else {
                subject.to_owned()
            },
            ..plain(&contact.email)
        }),
        CHANNEL_SNS if contact.sns_handle.is_empty() => Err(Unsupported::NoSnsHandle),
        CHANNEL_SNS => Ok(plain(&contact.sns_handle)),
        _ => Err(Unsupported::UnknownChannel),
    }
}

/// An e-mail subject made from the text when none was given.
fn first_words(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= 60 {
        line.to_owned()
    } else {
        let cut: String = line.chars().take(57).collect();
        format!("{cut}...")
    }
}

/// Septets a character takes in the GSM 03.38 alphabet: 1 (basic set), 2
/// (extension table, sent as escape + character), or `None` (not GSM: UCS-2).
fn gsm_septets(c: char) -> Option<usize> {
    const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
        ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const EXTENDED: &str = "^{}\\[~]|€\u{c}";
    if BASIC.contains(c) {
        Some(1)
    } else if EXTENDED.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// The GSM 03.38 basic set in septet order (0x1B, the escape, has no glyph).
const GSM_BASIC: [char; 127] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', 'Δ', '_',
    'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', 'Æ', 'æ', 'ß', 'É', ' ', '!', '"', '#', '¤', '%',
    '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', '0', '1', '2', '3', '4', '5', '6', '7', '8',
    '9', ':', ';', '<', '=', '>', '?', '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K',
    'L', 'M', 'N', 'O', 'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü',
    '§', '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', 'q',
    'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à',
];
/// The extension table: character and its septet after the escape.
const GSM_EXTENDED: [(char, u8); 10] = [
    ('\u{c}', 0x0A),
    ('^', 0x14),
    ('{', 0x28),
    ('}', 0x29),
    ('\\', 0x2F),
    ('[', 0x3C),
    ('~', 0x3D),
    (']', 0x3E),
    ('|', 0x40),
    ('€', 0x65),
];

/// SMS parts as an SMSC takes them: the data coding (0: the GSM default
/// alphabet, one septet per octet; 8: UCS-2, UTF-16 big-endian) and each
/// part's user data, with a concatenation header (`05 00 03 ref total n`)
/// when there are several. `reference` tells this message's parts from
/// another's at the handset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmsPayload {
    pub data_coding: u8,
    /// Whether the parts carry a user data header (esm_class UDHI).
    pub udh: bool,
    pub parts: Vec<Vec<u8>>,
}

/// Encodes the parts [`sms_segments`] made of a text.
pub fn sms_payload(segments: &[String], reference: u8) -> SmsPayload {
    let gsm = segments
        .iter()
        .all(|part| part.chars().all(|c| gsm_septets(c).is_some()));
    let udh = segments.len() > 1;
    let parts = segments
        .iter()
        .enumerate()
        .map(|(n, segment)| {
            let mut bytes = Vec::with_capacity(160);
            if udh {
                bytes.extend_from_slice(&[0x05, 0x00, 0x03, reference, segments.len() as u8]);
                bytes.push(n as u8 + 1);
            }
            if gsm {
                for c in segment.chars() {
                    if let Some(septet) = GSM_BASIC.iter().position(|&b| b == c) {
                        // The escape (0x1B) sits between Ξ and Æ.
                        bytes.push(if septet >= 0x1B { septet + 1 } else { septet } as u8);
                    } else if let Some((_, septet)) = GSM_EXTENDED.iter().find(|(e, _)| *e == c) {
                        bytes.extend_from_slice(&[0x1B, *septet]);
                    }
                }
            } else {
                for unit in segment.encode_utf16() {
                    bytes.extend_from_slice(&unit.to_be_bytes());
                }
            }
            bytes
        })
        .collect();
    SmsPayload {
        data_coding: if gsm { 0x00 } else { 0x08 },
        udh,
        parts,
    }
}

/// The SMS parts of `text`.
pub fn sms_segments(text: &str) -> Vec<String> {
    let gsm = text.chars().all(|c| gsm_septets(c).is_some());
    // (units in a single message, units per concatenated part, units of a char)
    let (single, part): (usize, usize) = if gsm { (160, 153) } else { (70, 67) };
    let units = |c: char| {
        if gsm {
            gsm_septets(c).unwrap_or(1)
        } else {
            c.len_utf16()
        }
    };
    let total: usize = text.chars().map(units).sum();
    if total <= single {
        return vec![text.to_owned()];
    }
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut used = 0;
    for c in text.chars() {
        let size = units(c);
        if used + size > part {
            parts.push(std::mem::take(&mut current));
            used = 0;
        }
        current.push(c);
        used += size;
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm_text_fits_160_then_splits_by_153() {
        assert_eq!(sms_segments(&"a".repeat(160)).len(), 1);
        let parts = sms_segments(&"a".repeat(161));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 153);
        assert_eq!(sms_segments(&"a".repeat(306)).len(), 2);
        assert_eq!(sms_segments(&"a".repeat(307)).len(), 3);
    }

    #[test]
    fn extension_characters_take_two_septets_and_never_split() {
        // 80 euro signs are 160 septets: one message.
        assert_eq!(sms_segments(&"€".repeat(80)).len(), 1);
        // 81 are 162: two parts of at most 153 septets, each sign whole.
        let parts = sms_segments(&"€".repeat(81));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].chars().count(), 76);
    }

    #[test]
    fn non_gsm_text_is_ucs2_70_then_67() {
        assert_eq!(sms_segments(&"あ".repeat(70)).len(), 1);
        let parts = sms_segments(&"あ".repeat(71));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].chars().count(), 67);
    }

    #[test]
    fn surrogate_pairs_and_zwj_sequences_stay_whole() {
        // A family emoji: 4 people joined by ZWJ, 11 UTF-16 units; 7 of them are 77 units.
        let family = "👨\u{200d}👩\u{200d}👧\u{200d}👦";
        let text = family.repeat(7);
        let parts = sms_segments(&text);
        assert_eq!(parts.concat(), text);
        for part in &parts {
            assert!(part.encode_utf16().count() <= 67);
            // No part starts or ends inside a surrogate pair (it is valid UTF-8 at all).
            assert!(!part.is_empty());
        }
    }

    #[test]
    fn sms_payloads_are_gsm_septets_or_ucs2_with_a_concatenation_header() {
        let one = sms_payload(&sms_segments("@Hi €_"), 7);
        assert_eq!(one.data_coding, 0);
        assert!(!one.udh);
        assert_eq!(
            one.parts,
            vec![vec![0x00, 0x48, 0x69, 0x20, 0x1B, 0x65, 0x11]]
        );
        // Æ follows the escape: 0x1C.
        assert_eq!(sms_payload(&["Æ".to_owned()], 0).parts[0], vec![0x1C]);

        let japanese = sms_payload(&sms_segments(&"あ".repeat(71)), 9);
        assert_eq!(japanese.data_coding, 8);
        assert!(japanese.udh);
        assert_eq!(japanese.parts.len(), 2);
        assert_eq!(&japanese.parts[0][..6], &[0x05, 0x00, 0x03, 9, 2, 1]);
        assert_eq!(&japanese.parts[1][..6], &[0x05, 0x00, 0x03, 9, 2, 2]);
        assert_eq!(japanese.parts[0].len(), 6 + 67 * 2);
        assert_eq!(
            &japanese.parts[1][6..],
            &[0x30, 0x42, 0x30, 0x42, 0x30, 0x42, 0x30, 0x42]
        );
        for part in japanese.parts.iter().chain(&one.parts) {
            assert!(part.len() <= 140 + 20, "fits a short_message");
        }
    }

    #[test]
    fn email_and_sns_need_an_address() {
        let none = Contact::default();
        assert_eq!(
            render(CHANNEL_EMAIL, "hi", "", "", &[], &none),
            Err(Unsupported::NoEmailAddress)
        );
        assert_eq!(
            render(CHANNEL_SNS, "hi", "", "", &[], &none),
            Err(Unsupported::NoSnsHandle)
        );
        let contact = Contact {
            email: "a@example.com".into(),
            ..Contact::default()
        };
        let mail = render(CHANNEL_EMAIL, "Hello there", "", "", &[], &contact).unwrap();
        assert_eq!(mail.subject, "Hello there");
        assert_eq!(mail.address, "a@example.com");
    }

    #[test]
    fn rich_parts_survive_only_on_rcs() {
        let replies = vec!["Yes".to_owned(), "No".to_owned()];
        let rcs = render(
            CHANNEL_RCS,
            "t",
            "https://x/m.png",
            "",
            &replies,
            &Contact::default(),
        )
        .unwrap();
        assert_eq!(rcs.suggested_replies, replies);
        assert_eq!(rcs.media_url, "https://x/m.png");
        let sms = render(
            CHANNEL_SMS,
            "t",
            "https://x/m.png",
            "",
            &replies,
            &Contact::default(),
        )
        .unwrap();
        assert!(sms.suggested_replies.is_empty() && sms.media_url.is_empty());
        assert_eq!(sms.sms_segments, vec!["t".to_owned()]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_000))]

        /// Any text: the parts put back together are the text, none is
        /// empty, and each fits its encoding's part size.
        #[test]
        fn sms_parts_rebuild_the_text_and_fit(
            text in "(\\PC|\u{1F469}\u{200D}\u{1F4BB}|\u{1F1EF}\u{1F1F5}|€|\\[|a|あ){0,400}",
        ) {
            let parts = sms_segments(&text);
            proptest::prop_assert_eq!(parts.concat(), text.clone());
            if parts.len() > 1 {
                let gsm = text.chars().all(|c| gsm_septets(c).is_some());
                for part in &parts {
                    proptest::prop_assert!(!part.is_empty());
                    let units: usize = if gsm {
                        part.chars().map(|c| gsm_septets(c).unwrap_or(1)).sum()
                    } else {
                        part.encode_utf16().count()
                    };
                    let limit = if gsm { 153 } else { 67 };
                    proptest::prop_assert!(units <= limit);
                }
            }
        }
    }
}
