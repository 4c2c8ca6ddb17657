//! The `Carrier.Deliver` stream's protocol version, and the shape checks of
//! its packed records that both ends apply before converting them.
//!
//! Version 2 packs a batch per message: content and instructions once, the
//! recipients as parallel columns (`MessageDeliveries`); receipts travel up
//! packed the same way (`MessageReceipts`). The relay names its version in
//! the request metadata, the carrier answers with its own in the response
//! metadata, and each refuses a peer on another version with an error naming
//! both: a mismatched pair fails at the first call, never halfway through a
//! campaign. A peer that names no version speaks version 1 (which had no
//! header). Version 3 gives the priority lane a stream of its own: the relay
//! opens two per carrier, the second naming `priority` in
//! `chukei-deliver-lane`, so a targeted message's batch never queues behind a
//! campaign's batches on the wire or in the carrier's session loop. This
//! module must never hold business logic.

use tonic::metadata::MetadataMap;

use crate::carrier::v1 as pb;

/// The version this build speaks.
pub const PROTOCOL_VERSION: u32 = 3;

/// The metadata key that carries the version, on the request and the response.
pub const VERSION_HEADER: &str = "chukei-deliver-version";

/// The version a peer named in `metadata` (1 when it named none; 0 when what
/// it named is not a number).
pub fn version_in(metadata: &MetadataMap) -> u32 {
    match metadata.get(VERSION_HEADER) {
        None => 1,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// Puts this build's version into `metadata`.
pub fn put_version(metadata: &mut MetadataMap) {
    metadata.insert(VERSION_HEADER, PROTOCOL_VERSION.into());
}

/// The request metadata key naming what a stream carries (version 3).
pub const LANE_HEADER: &str = "chukei-deliver-lane";

/// What one `Deliver` stream of a relay carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The bulk lane and everything else: erasure notices down; receipts,
    /// count reports and erasure acks up. Named by no lane header.
    Main,
    /// The priority lane's batches down and their acks up, nothing else.
    Priority,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Priority => "priority",
        }
    }
}

/// Names `stream` in a request's `metadata` (the main stream names none).
pub fn put_stream(metadata: &mut MetadataMap, stream: Stream) {
    if stream == Stream::Priority {
        metadata.insert(
            LANE_HEADER,
            tonic::metadata::MetadataValue::from_static("priority"),
        );
    }
}

/// The stream a relay's request names; an unknown lane is refused, named.
pub fn stream_in(metadata: &MetadataMap) -> Result<Stream, String> {
    match metadata.get(LANE_HEADER).map(|v| v.to_str()) {
        None => Ok(Stream::Main),
        Some(Ok("priority")) => Ok(Stream::Priority),
        Some(Ok(other)) => Err(format!(
            "{LANE_HEADER}: unknown lane {other:?}; expected \"priority\" or no header"
        )),
        Some(Err(_)) => Err(format!("{LANE_HEADER}: not ASCII")),
    }
}

/// Refuses a peer (`peer`: "relay" or "carrier") that speaks another version,
/// naming both.
pub fn check_version(peer: &str, theirs: u32) -> Result<(), String> {
    if theirs == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(format!(
        "Deliver protocol version mismatch: the {peer} speaks version {theirs}, this side speaks version {PROTOCOL_VERSION}; upgrade the older side"
    ))
}

/// How many deliveries a packed record holds, once its columns are checked:
/// every per-delivery column has that many entries (or none, where none means
/// "the shared value").
pub fn deliveries_len(record: &pb::MessageDeliveries) -> Result<usize, String> {
    let len = record.delivery_ids.len();
    column("user_ids", record.user_ids.len(), len, false)?;
    column("channels", record.channels.len(), len, true)?;
    column(
        "not_before_each_ms",
        record.not_before_each_ms.len(),
        len,
        true,
    )?;
    if record.message_id.is_empty() {
        return Err("message_id: must not be empty".into());
    }
    Ok(len)
}

/// How many receipts a packed record holds, once its columns are checked.
pub fn receipts_len(record: &pb::MessageReceipts) -> Result<usize, String> {
    let len = record.user_ids.len();
    column("delivery_ids", record.delivery_ids.len(), len, false)?;
    column("kinds", record.kinds.len(), len, false)?;
    column("channels", record.channels.len(), len, false)?;
    column("at_ms", record.at_ms.len(), len, false)?;
    column("region_index", record.region_index.len(), len, false)?;
    if let Some(index) = record
        .region_index
        .iter()
        .find(|&&i| i as usize >= record.regions.len().max(1))
    {
        return Err(format!(
            "region_index: {index} is past the {} regions named",
            record.regions.len()
        ));
    }
    if record.message_id.is_empty() {
        return Err("message_id: must not be empty".into());
    }
    Ok(len)
}

/// The region a receipt's `region_index` names ("" when the batch names none).
pub fn region(record: &pb::MessageReceipts, index: usize) -> &str {
    record
        .region_index
        .get(index)
        .and_then(|&i| record.regions.get(i as usize))
        .map_or("", String::as_str)
}

fn column(name: &str, actual: usize, expected: usize, may_be_empty: bool) -> Result<(), String> {
    if actual == expected || (may_be_empty && actual == 0) {
        Ok(())
    } else {
        Err(format!("{name}: {actual} entries for {expected} records"))
    }
}

/// Builds one message's packed receipts, naming each region once.
#[derive(Debug, Default)]
pub struct ReceiptPacker {
    record: pb::MessageReceipts,
    regions: std::collections::HashMap<String, u32>,
}

impl ReceiptPacker {
    pub fn new(message_id: String) -> Self {
        let mut packer = Self::default();
        packer.record.message_id = message_id;
        // Index 0 is the unknown place.
        packer.record.regions.push(String::new());
        packer.regions.insert(String::new(), 0);
        packer
    }

    /// Adds one receipt; the first non-empty trace is the record's.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        delivery_id: u64,
        user_id: String,
        kind: u8,
        channel: u8,
        at_ms: i64,
        region: &str,
        trace_parent: &str,
    ) {
        let next = self.record.regions.len() as u32;
        let index = *self.regions.entry(region.to_owned()).or_insert_with(|| {
            self.record.regions.push(region.to_owned());
            next
        });
        if self.record.trace_parent.is_empty() {
            self.record.trace_parent = trace_parent.to_owned();
        }
        self.record.delivery_ids.push(delivery_id);
        self.record.user_ids.push(user_id);
        self.record.kinds.push(kind);
        self.record.channels.push(channel);
        self.record.at_ms.push(at_ms);
        self.record.region_index.push(index);
    }

    pub fn finish(self) -> pb::MessageReceipts {
        self.record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_on_another_version_is_refused_naming_both() {
        assert!(check_version("carrier", PROTOCOL_VERSION).is_ok());
        let error = check_version("relay", 1).unwrap_err();
        assert!(error.contains("relay speaks version 1"), "{error}");
        assert!(
            error.contains(&format!("this side speaks version {PROTOCOL_VERSION}")),
            "{error}"
        );
        let mut metadata = MetadataMap::new();
        assert_eq!(version_in(&metadata), 1, "no header: version 1");
        put_version(&mut metadata);
        assert_eq!(version_in(&metadata), PROTOCOL_VERSION);
        metadata.insert(VERSION_HEADER, "two".parse().unwrap());
        assert_eq!(version_in(&metadata), 0);
    }

    #[test]
    fn the_priority_stream_is_named_and_an_unknown_lane_refused() {
        let mut metadata = MetadataMap::new();
        put_stream(&mut metadata, Stream::Main);
        assert_eq!(stream_in(&metadata), Ok(Stream::Main));
        assert!(
            metadata.get(LANE_HEADER).is_none(),
            "the main stream names no lane"
        );
        put_stream(&mut metadata, Stream::Priority);
        assert_eq!(stream_in(&metadata), Ok(Stream::Priority));
        metadata.insert(LANE_HEADER, "express".parse().unwrap());
        let error = stream_in(&metadata).unwrap_err();
        assert!(
            error.starts_with("chukei-deliver-lane: unknown lane \"express\""),
            "{error}"
        );
    }

    #[test]
    fn packed_columns_must_line_up() {
        let mut record = pb::MessageDeliveries {
            message_id: "m".into(),
            delivery_ids: vec![1, 2],
            user_ids: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        assert_eq!(deliveries_len(&record), Ok(2));
        record.channels = vec![2];
        let error = deliveries_len(&record).unwrap_err();
        assert!(error.starts_with("channels: 1 entries for 2"), "{error}");
        record.channels = vec![2, 4];
        record.user_ids.pop();
        assert!(deliveries_len(&record).unwrap_err().starts_with("user_ids"));
    }

    #[test]
    fn receipts_name_each_region_once() {
        let mut packer = ReceiptPacker::new("m".into());
        packer.push(7, "a".into(), 1, 2, 10, "tokyo", "");
        packer.push(8, "b".into(), 2, 2, 11, "osaka", "00-ab-cd-01");
        packer.push(9, "c".into(), 1, 2, 12, "tokyo", "00-ef-01-01");
        packer.push(0, "d".into(), 1, 2, 13, "", "");
        let record = packer.finish();
        assert_eq!(receipts_len(&record), Ok(4));
        assert_eq!(record.regions, ["", "tokyo", "osaka"]);
        assert_eq!(record.trace_parent, "00-ab-cd-01");
        let regions: Vec<&str> = (0..4).map(|i| region(&record, i)).collect();
        assert_eq!(regions, ["tokyo", "osaka", "tokyo", ""]);
        let mut broken = record.clone();
        broken.region_index[0] = 9;
        assert!(
            receipts_len(&broken)
                .unwrap_err()
                .starts_with("region_index: 9")
        );
    }
}
