//! The `Terminal.Push` streams a carrier keeps to a terminal endpoint: the
//! main one (the bulk lane and the carrier's own notices) and, on a
//! connection of its own, one for the priority lane (targeted messages),
//! named by [`LANE_HEADER`], so a targeted message never queues behind a
//! campaign's pushes — in either stream's HTTP/2 windows or in the
//! terminal's work on them. A terminal may answer events on either stream
//! (the carrier reads both); one that knows the header keeps sending later
//! events (reads) on the main stream.

use tonic::metadata::{MetadataMap, MetadataValue};

/// The metadata key naming the priority stream (`priority`); the main
/// stream names none.
pub const LANE_HEADER: &str = "chukei-push-lane";

/// Names the stream as the priority lane's.
pub fn put_priority(metadata: &mut MetadataMap) {
    metadata.insert(LANE_HEADER, MetadataValue::from_static("priority"));
}

/// Whether a carrier's `Push` request names the priority stream.
pub fn is_priority(metadata: &MetadataMap) -> bool {
    metadata
        .get(LANE_HEADER)
        .is_some_and(|value| value.to_str().is_ok_and(|lane| lane == "priority"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_priority_stream_is_named_and_the_main_one_is_not() {
        let mut metadata = MetadataMap::new();
        assert!(!is_priority(&metadata));
        put_priority(&mut metadata);
        assert!(is_priority(&metadata));
        metadata.insert(LANE_HEADER, MetadataValue::from_static("bulk"));
        assert!(!is_priority(&metadata));
    }
}
