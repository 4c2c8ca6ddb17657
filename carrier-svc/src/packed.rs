//! The compact binary forms the carrier keeps in its own SQLite: a batch
//! row's recipients (one blob per message record of a relay batch) and an
//! outbox row's receipts (one blob per group of terminal events). Storing a
//! thousand recipients as one blob costs about what one row does; a row per
//! person was most of the carrier's CPU (`docs/benchmarks.md`).
//!
//! Little-endian, length-prefixed strings; a blob that does not decode is an
//! error naming what was short, never a panic. Owns no SQL and no wire types.

use crate::model::{Receipt, ReceiptKind, Recipient};

/// The encoded recipients of one batch row, in their row order.
pub fn encode_recipients(recipients: &[Recipient]) -> Vec<u8> {
    let mut out = Vec::with_capacity(recipients.len() * 32);
    for r in recipients {
        out.extend_from_slice(&r.delivery_id.to_le_bytes());
        out.push(r.channel as u8);
        out.extend_from_slice(&r.not_before.to_le_bytes());
        put_str(&mut out, &r.user_id);
    }
    out
}

pub fn decode_recipients(mut blob: &[u8]) -> Result<Vec<Recipient>, Short> {
    let mut recipients = Vec::new();
    while !blob.is_empty() {
        let delivery_id = u64::from_le_bytes(take(&mut blob, "delivery id")?);
        let [channel] = take::<1>(&mut blob, "channel")?;
        let not_before = i64::from_le_bytes(take(&mut blob, "not before")?);
        let user_id = take_str(&mut blob, "user id")?;
        recipients.push(Recipient {
            delivery_id,
            user_id,
            channel: i64::from(channel),
            not_before,
        });
    }
    Ok(recipients)
}

/// Just the delivery ids of an encoded recipient list (for the duplicate
/// check rebuilt at start-up).
pub fn delivery_ids(blob: &[u8]) -> Result<Vec<u64>, Short> {
    Ok(decode_recipients(blob)?
        .into_iter()
        .map(|r| r.delivery_id)
        .collect())
}

/// The encoded receipts of one outbox row (their `seq` is the row's, not stored).
pub fn encode_receipts(receipts: &[Receipt]) -> Vec<u8> {
    let mut out = Vec::with_capacity(receipts.len() * 64);
    for r in receipts {
        out.extend_from_slice(&r.delivery_id.to_le_bytes());
        out.push(r.kind as u8);
        out.push(r.channel as u8);
        out.extend_from_slice(&r.at.to_le_bytes());
        put_str(&mut out, &r.message_id);
        put_str(&mut out, &r.user_id);
        put_str(&mut out, &r.region);
        put_str(&mut out, &r.trace_parent);
    }
    out
}

/// Receipts of an outbox row, each with `seq` 0 until the caller sets the row's.
pub fn decode_receipts(mut blob: &[u8]) -> Result<Vec<Receipt>, Short> {
    let mut receipts = Vec::new();
    while !blob.is_empty() {
        let delivery_id = u64::from_le_bytes(take(&mut blob, "delivery id")?);
        let [kind, channel] = take::<2>(&mut blob, "kind and channel")?;
        let at = i64::from_le_bytes(take(&mut blob, "time")?);
        receipts.push(Receipt {
            seq: 0,
            delivery_id,
            kind: ReceiptKind::from_number(i64::from(kind)),
            channel: i64::from(channel),
            at,
            message_id: take_str(&mut blob, "message id")?,
            user_id: take_str(&mut blob, "user id")?,
            region: take_str(&mut blob, "region")?,
            trace_parent: take_str(&mut blob, "trace")?,
        });
    }
    Ok(receipts)
}

/// A stored blob ended before the named field (or a string was not UTF-8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stored blob unreadable at its {0}")]
pub struct Short(pub &'static str);

fn put_str(out: &mut Vec<u8>, value: &str) {
    // Ids, places and traces are short; a longer value is cut at a character
    // boundary rather than written with a length that does not fit.
    let mut end = value.len().min(u16::MAX as usize);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&value.as_bytes()[..end]);
}

fn take<const N: usize>(blob: &mut &[u8], what: &'static str) -> Result<[u8; N], Short> {
    let (head, rest) = blob.split_first_chunk::<N>().ok_or(Short(what))?;
    *blob = rest;
    Ok(*head)
}

fn take_str(blob: &mut &[u8], what: &'static str) -> Result<String, Short> {
    let len = u16::from_le_bytes(take(blob, what)?) as usize;
    if blob.len() < len {
        return Err(Short(what));
    }
    let (head, rest) = blob.split_at(len);
    *blob = rest;
    String::from_utf8(head.to_vec()).map_err(|_| Short(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_and_receipts_come_back_as_written() {
        let recipients = vec![
            Recipient {
                delivery_id: u64::MAX,
                user_id: "user-0000001".into(),
                channel: 2,
                not_before: -5,
            },
            Recipient {
                delivery_id: 7,
                user_id: "ユーザー".into(),
                channel: 4,
                not_before: 1_795_651_200_000,
            },
        ];
        let blob = encode_recipients(&recipients);
        assert_eq!(decode_recipients(&blob).unwrap(), recipients);
        assert_eq!(delivery_ids(&blob).unwrap(), [u64::MAX, 7]);
        assert_eq!(
            decode_recipients(&blob[..blob.len() - 1]),
            Err(Short("user id"))
        );

        let receipts = vec![Receipt {
            seq: 0,
            delivery_id: 9,
            message_id: "msg".into(),
            user_id: "u".into(),
            kind: ReceiptKind::Opened,
            channel: 1,
            at: 42,
            region: "tokyo/shibuya".into(),
            trace_parent: String::new(),
        }];
        let blob = encode_receipts(&receipts);
        assert_eq!(decode_receipts(&blob).unwrap(), receipts);
        assert_eq!(decode_receipts(&blob[..3]), Err(Short("delivery id")));
    }
}
