//! Property tests of the shared types as they travel and are stored (issue
//! 12): a node record (bincode, inside a signed envelope), the policy (TOML
//! from `policy apply -f`, JSON over the HTTP API, bincode in the Raft log),
//! a member row (JSON over the HTTP API), and region names, which only ever
//! decode when valid. Truncated or bit-flipped bytes are an error or another
//! value, never a panic.

use mesh_types::policy::{AllowedModel, Policy, Rate, RateLimits, ResidencyRule};
use mesh_types::{
    Load, MemberState, MemberView, ModelAdvert, NodeId, NodeRecord, RaftRole, Region,
};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(".{0,24}").expect("a valid regex")
}

fn region() -> impl Strategy<Value = Region> {
    "[a-z]([a-z0-9-]{0,20}[a-z0-9])?".prop_map(|s| Region::parse(&s).expect("a valid region"))
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::collection::vec(
            (
                text(),
                prop::collection::vec(region(), 0..3),
                prop::collection::vec(region(), 0..3),
            )
                .prop_map(|(tag, regions, results)| ResidencyRule {
                    tag,
                    regions,
                    results,
                }),
            0..3,
        ),
        prop::collection::vec(
            (text(), "[0-9a-f]{64}").prop_map(|(name, sha256)| AllowedModel { name, sha256 }),
            0..3,
        ),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(|(residency, models, (a, b, c, d))| Policy {
            residency,
            models,
            rate_limits: RateLimits {
                per_agent: Rate {
                    per_second: a,
                    burst: b,
                },
                per_client: Rate {
                    per_second: c,
                    burst: d,
                },
            },
        })
}

fn raft_role() -> impl Strategy<Value = Option<RaftRole>> {
    prop::option::of(prop_oneof![Just(RaftRole::Voter), Just(RaftRole::Learner)])
}

fn record() -> impl Strategy<Value = NodeRecord> {
    (
        (
            text(),
            region(),
            prop::collection::vec(text(), 0..5),
            text(),
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
        (
            prop::collection::vec(
                (text(), text()).prop_map(|(name, sha256)| ModelAdvert { name, sha256 }),
                0..3,
            ),
            prop::collection::vec(text(), 0..3),
            (any::<u32>(), any::<u32>()),
            prop::option::of(text()),
            raft_role(),
        ),
    )
        .prop_map(
            |(
                (node_id, region, addrs, version),
                (started_at_ms, seq, sent_at_ms, leaving),
                (models, datasets, (tasks_running, agents_active), api, raft),
            )| NodeRecord {
                node_id: NodeId(node_id),
                region,
                addrs,
                version,
                started_at_ms,
                seq,
                sent_at_ms,
                leaving,
                models,
                datasets,
                load: Load {
                    tasks_running,
                    agents_active,
                },
                api,
                raft,
            },
        )
}

fn member_view() -> impl Strategy<Value = MemberView> {
    (
        (
            text(),
            region(),
            prop::sample::select(MemberState::ALL.to_vec()),
        ),
        (
            prop::collection::vec(text(), 0..3),
            any::<u64>(),
            text(),
            any::<bool>(),
        ),
        (
            prop::option::of(text()),
            raft_role(),
            prop::collection::vec(text(), 0..3),
        ),
    )
        .prop_map(
            |(
                (peer_id, region, state),
                (addrs, last_seen_ms, version, is_self),
                (api, raft, models),
            )| {
                MemberView {
                    peer_id: NodeId(peer_id),
                    region,
                    state,
                    addrs,
                    last_seen_ms,
                    version,
                    is_self,
                    api,
                    raft,
                    models,
                }
            },
        )
}

fn bincode_encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("encodes")
}

fn bincode_decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(
        bytes,
        bincode::config::standard().with_limit::<{ 1024 * 1024 }>(),
    )
    .map(|(v, _)| v)
}

/// bincode: round trip; a truncation is an error; a bit flip an error or
/// another value.
fn check_bincode<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    value: &T,
    cut: prop::sample::Index,
    at: prop::sample::Index,
    bit: u8,
) -> Result<(), TestCaseError> {
    let bytes = bincode_encode(value);
    prop_assert_eq!(&bincode_decode::<T>(&bytes).expect("decodes"), value);
    let len = cut.index(bytes.len());
    prop_assert!(bincode_decode::<T>(&bytes[..len]).is_err());
    let mut flipped = bytes;
    let i = at.index(flipped.len());
    flipped[i] ^= 1 << bit;
    if let Ok(other) = bincode_decode::<T>(&flipped) {
        prop_assert_ne!(&other, value);
    }
    Ok(())
}

proptest! {
    #[test]
    fn node_records_round_trip_in_bincode(
        r in record(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        check_bincode(&r, cut, at, bit)?;
    }

    #[test]
    fn policies_round_trip_in_bincode(
        p in policy(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        check_bincode(&p, cut, at, bit)?;
    }

    #[test]
    fn policies_round_trip_in_toml_and_json(p in policy()) {
        let text = toml::to_string_pretty(&p).expect("prints as TOML");
        prop_assert_eq!(&toml::from_str::<Policy>(&text).expect("parses"), &p);
        let json = serde_json::to_vec(&p).expect("prints as JSON");
        prop_assert_eq!(&serde_json::from_slice::<Policy>(&json).expect("parses"), &p);
    }

    #[test]
    fn damaged_policy_text_never_panics(
        p in policy(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        // Text formats: a cut can still parse (a dropped last newline, or
        // a field that falls back to its default), so only no panic here.
        for bytes in [
            toml::to_string_pretty(&p).expect("prints").into_bytes(),
            serde_json::to_vec(&p).expect("prints"),
        ] {
            let len = cut.index(bytes.len());
            let mut flipped = bytes.clone();
            let i = at.index(flipped.len());
            flipped[i] ^= 1 << bit;
            for damaged in [&bytes[..len], &flipped[..]] {
                if let Ok(text) = std::str::from_utf8(damaged) {
                    if let Ok(policy) = toml::from_str::<Policy>(text) {
                        let _ = policy.validate();
                    }
                }
                if let Ok(policy) = serde_json::from_slice::<Policy>(damaged) {
                    let _ = policy.validate();
                }
            }
        }
    }

    #[test]
    fn member_rows_round_trip_in_json(m in member_view()) {
        let json = serde_json::to_vec(&m).expect("prints");
        prop_assert_eq!(serde_json::from_slice::<MemberView>(&json).expect("parses"), m);
    }

    #[test]
    fn a_region_decodes_only_when_valid(name in prop_oneof![".{0,70}", "[a-z0-9-]{0,70}"]) {
        let valid = Region::parse(&name).is_ok();
        let from_json = serde_json::from_value::<Region>(serde_json::Value::String(name.clone()));
        prop_assert_eq!(from_json.is_ok(), valid);
        let from_bincode = bincode_decode::<Region>(&bincode_encode(&name));
        prop_assert_eq!(from_bincode.is_ok(), valid);
        if let Ok(region) = from_bincode {
            prop_assert_eq!(region.as_str(), name.as_str());
        }
    }

    #[test]
    fn any_bytes_decode_as_a_record_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = bincode_decode::<NodeRecord>(&bytes);
        let _ = bincode_decode::<Policy>(&bytes);
    }
}
