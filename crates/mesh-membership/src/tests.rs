//! Engine tests: events in, commands and view out, time passed by hand.

use mesh_types::{Load, MemberState, NodeId, NodeRecord, Region};

use super::*;

const T0: UnixMillis = 1_000_000;
const GEN: u64 = 1 << 32;

fn config() -> Config {
    Config {
        announce_interval_ms: 100,
        suspect_after_ms: 1_000,
        dead_after_ms: 3_000,
        forget_after_ms: 60_000,
        max_clock_skew_ms: 5_000,
        max_members: 100,
    }
}

fn record(id: &str, seq: u64, sent_at_ms: UnixMillis) -> NodeRecord {
    NodeRecord {
        node_id: NodeId(id.into()),
        region: Region::parse("eu-west").expect("valid"),
        addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 4000 + id.len())],
        version: "test".into(),
        started_at_ms: T0,
        seq,
        sent_at_ms,
        leaving: false,
        models: vec![],
        datasets: vec![],
        load: Load::default(),
        api: None,
        raft: None,
    }
}

fn engine() -> Membership {
    Membership::new(config(), record("local", GEN, T0), T0)
}

fn changes(commands: &[Command]) -> Vec<(String, Option<MemberState>, MemberState)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::StateChanged { node, from, to } => Some((node.0.clone(), *from, *to)),
            _ => None,
        })
        .collect()
}

fn peer() -> NodeId {
    NodeId("peer".into())
}

#[test]
fn first_record_makes_a_member_alive() {
    let mut m = engine();
    let out = m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    assert_eq!(
        changes(&out),
        vec![("peer".into(), None, MemberState::Alive)]
    );
    assert_eq!(m.state(&peer()), Some(MemberState::Alive));
}

#[test]
fn suspicion_starts_exactly_at_the_timeout() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    let out = m.handle(Event::Tick, T0 + 999);
    assert!(changes(&out).is_empty(), "one millisecond early: {out:?}");
    let out = m.handle(Event::Tick, T0 + 1_000);
    assert_eq!(
        changes(&out),
        vec![(
            "peer".into(),
            Some(MemberState::Alive),
            MemberState::Suspect
        )]
    );
}

#[test]
fn death_starts_exactly_at_the_timeout() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    m.handle(Event::Tick, T0 + 1_500);
    let out = m.handle(Event::Tick, T0 + 2_999);
    assert!(changes(&out).is_empty(), "one millisecond early: {out:?}");
    let out = m.handle(Event::Tick, T0 + 3_000);
    assert_eq!(
        changes(&out),
        vec![("peer".into(), Some(MemberState::Suspect), MemberState::Dead)]
    );
}

#[test]
fn a_late_tick_goes_straight_from_alive_to_dead() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    let out = m.handle(Event::Tick, T0 + 10_000);
    assert_eq!(
        changes(&out),
        vec![("peer".into(), Some(MemberState::Alive), MemberState::Dead)]
    );
}

#[test]
fn a_fresh_record_clears_suspicion() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    m.handle(Event::Tick, T0 + 1_200);
    assert_eq!(m.state(&peer()), Some(MemberState::Suspect));
    let out = m.handle(
        Event::Record(record("peer", GEN + 2, T0 + 1_250)),
        T0 + 1_250,
    );
    assert_eq!(
        changes(&out),
        vec![(
            "peer".into(),
            Some(MemberState::Suspect),
            MemberState::Alive
        )]
    );
    // The silence is counted from the new record.
    assert!(changes(&m.handle(Event::Tick, T0 + 2_249)).is_empty());
}

#[test]
fn a_duplicate_record_does_not_refresh_liveness() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    let out = m.handle(Event::Record(record("peer", GEN + 1, T0)), T0 + 900);
    assert!(out.is_empty());
    let out = m.handle(Event::Tick, T0 + 1_000);
    assert_eq!(changes(&out).len(), 1, "silence counts from the first copy");
}

#[test]
fn restart_with_a_higher_generation_revives_a_dead_member() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 500, T0)), T0);
    m.handle(Event::Tick, T0 + 3_000);
    assert_eq!(m.state(&peer()), Some(MemberState::Dead));
    // The restarted process starts its counter at 1 again, but in generation 2.
    let out = m.handle(
        Event::Record(record("peer", 2 * GEN + 1, T0 + 4_000)),
        T0 + 4_000,
    );
    assert_eq!(
        changes(&out),
        vec![("peer".into(), Some(MemberState::Dead), MemberState::Alive)]
    );
}

#[test]
fn leave_is_left_not_dead_and_a_restart_revives_it() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    let mut leaving = record("peer", GEN + 2, T0 + 10);
    leaving.leaving = true;
    let out = m.handle(Event::Record(leaving), T0 + 10);
    assert_eq!(
        changes(&out),
        vec![("peer".into(), Some(MemberState::Alive), MemberState::Left)]
    );
    // Silence after a leave never turns it into dead.
    assert!(changes(&m.handle(Event::Tick, T0 + 50_000)).is_empty());
    assert_eq!(m.state(&peer()), Some(MemberState::Left));
    let out = m.handle(
        Event::Record(record("peer", 2 * GEN + 1, T0 + 50_001)),
        T0 + 50_001,
    );
    assert_eq!(
        changes(&out),
        vec![("peer".into(), Some(MemberState::Left), MemberState::Alive)]
    );
}

#[test]
fn a_record_with_a_lower_seq_is_ignored() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", 2 * GEN + 1, T0)), T0);
    let out = m.handle(Event::Record(record("peer", GEN + 900, T0 + 100)), T0 + 100);
    assert_eq!(
        out,
        vec![Command::RecordIgnored {
            node: peer(),
            reason: IgnoreReason::Stale
        }]
    );
    // ...and it did not refresh liveness either.
    assert_eq!(changes(&m.handle(Event::Tick, T0 + 1_000)).len(), 1);
}

#[test]
fn a_stale_leave_does_not_mark_a_restarted_node_left() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", 2 * GEN + 1, T0)), T0);
    let mut old_leave = record("peer", GEN + 7, T0);
    old_leave.leaving = true;
    m.handle(Event::Record(old_leave), T0 + 1);
    assert_eq!(m.state(&peer()), Some(MemberState::Alive));
}

#[test]
fn records_from_the_future_are_ignored_at_the_edge() {
    let mut m = engine();
    // Exactly at the allowed skew: accepted.
    let out = m.handle(Event::Record(record("edge", GEN + 1, T0 + 5_000)), T0);
    assert_eq!(changes(&out).len(), 1);
    // One millisecond beyond it: ignored, and the member is not created.
    let out = m.handle(Event::Record(record("peer", GEN + 1, T0 + 5_001)), T0);
    assert_eq!(
        out,
        vec![Command::RecordIgnored {
            node: peer(),
            reason: IgnoreReason::FromTheFuture
        }]
    );
    assert_eq!(m.state(&peer()), None);
}

#[test]
fn own_records_echoed_back_are_not_members() {
    let mut m = engine();
    let out = m.handle(Event::Record(record("local", 9 * GEN, T0)), T0);
    assert!(out.is_empty());
    assert_eq!(m.view(T0).len(), 1);
}

#[test]
fn announces_on_the_first_tick_and_then_every_interval() {
    let mut m = engine();
    let announced = |out: &[Command]| {
        out.iter()
            .filter_map(|c| match c {
                Command::Announce(r) => Some(r.seq),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(announced(&m.handle(Event::Tick, T0)), vec![GEN + 1]);
    assert!(announced(&m.handle(Event::Tick, T0 + 99)).is_empty());
    assert_eq!(announced(&m.handle(Event::Tick, T0 + 100)), vec![GEN + 2]);
}

#[test]
fn new_local_addresses_are_announced_at_once() {
    let mut m = engine();
    let out = m.handle(
        Event::LocalAddrs(vec!["/ip4/10.0.0.1/tcp/1".into()]),
        T0 + 1,
    );
    match out.as_slice() {
        [Command::Announce(r)] => assert_eq!(r.addrs, vec!["/ip4/10.0.0.1/tcp/1".to_string()]),
        other => panic!("expected one announcement, got {other:?}"),
    }
    assert!(m
        .handle(
            Event::LocalAddrs(vec!["/ip4/10.0.0.1/tcp/1".into()]),
            T0 + 2
        )
        .is_empty());
}

#[test]
fn leave_announces_a_leaving_record_with_a_higher_seq() {
    let mut m = engine();
    m.handle(Event::Tick, T0);
    match m.handle(Event::Leave, T0 + 5).as_slice() {
        [Command::Announce(r)] => {
            assert!(r.leaving);
            assert_eq!(r.seq, GEN + 2);
        }
        other => panic!("expected one announcement, got {other:?}"),
    }
}

#[test]
fn dead_members_are_forgotten_after_the_retention() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0);
    m.handle(Event::Tick, T0 + 3_000);
    assert!(m
        .handle(Event::Tick, T0 + 62_999)
        .iter()
        .all(|c| !matches!(c, Command::Forgot(_))));
    let out = m.handle(Event::Tick, T0 + 63_000);
    assert!(out.contains(&Command::Forgot(peer())));
    assert_eq!(m.state(&peer()), None);
}

#[test]
fn view_lists_self_first_then_by_region_and_id() {
    let mut m = engine();
    let mut us = record("b-us", GEN + 1, T0);
    us.region = Region::parse("us-east").expect("valid");
    m.handle(Event::Record(us), T0);
    m.handle(Event::Record(record("z-eu", GEN + 1, T0)), T0);
    m.handle(Event::Record(record("a-eu", GEN + 1, T0)), T0 + 10);
    let view = m.view(T0 + 20);
    let ids: Vec<_> = view.iter().map(|v| v.peer_id.0.as_str()).collect();
    assert_eq!(ids, vec!["local", "a-eu", "z-eu", "b-us"]);
    assert!(view[0].is_self);
    assert_eq!(view[1].last_seen_ms, 10);
    assert_eq!(view[2].last_seen_ms, 20);
}

#[test]
fn config_validation_explains_the_relation() {
    assert!(Config::default().validate().is_ok());
    let bad = Config {
        suspect_after_ms: 50,
        ..config()
    };
    assert!(bad
        .validate()
        .expect_err("invalid")
        .to_string()
        .contains("announce_interval_ms"));
    let bad = Config {
        dead_after_ms: 1_000,
        ..config()
    };
    assert!(matches!(
        bad.validate(),
        Err(ConfigError::DeadBeforeSuspect { .. })
    ));
    let bad = Config {
        announce_interval_ms: 0,
        ..config()
    };
    assert_eq!(bad.validate(), Err(ConfigError::ZeroAnnounceInterval));
}

#[test]
fn a_synced_record_counts_liveness_from_when_the_peer_saw_it() {
    let mut m = engine();
    let out = m.handle(
        Event::SyncedRecord {
            record: record("peer", GEN + 1, T0),
            age_ms: 400,
        },
        T0 + 400,
    );
    assert_eq!(
        changes(&out),
        vec![("peer".into(), None, MemberState::Alive)]
    );
    // Seen 400 ms before it reached us: suspect 400 ms earlier than a direct record.
    assert!(changes(&m.handle(Event::Tick, T0 + 999)).is_empty());
    assert_eq!(changes(&m.handle(Event::Tick, T0 + 1_000)).len(), 1);
}

#[test]
fn a_synced_record_older_than_the_suspicion_timeout_is_not_taken() {
    let mut m = engine();
    let stale = Event::SyncedRecord {
        record: record("peer", GEN + 1, T0),
        age_ms: 1_000,
    };
    assert!(m.handle(stale, T0 + 1_000).is_empty());
    assert_eq!(m.state(&peer()), None);
}

#[test]
fn a_synced_record_never_moves_liveness_backwards() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 1, T0)), T0 + 500);
    // A newer seq that the syncing peer got earlier than our own copy arrived.
    m.handle(
        Event::SyncedRecord {
            record: record("peer", GEN + 2, T0),
            age_ms: 900,
        },
        T0 + 1_000,
    );
    assert!(changes(&m.handle(Event::Tick, T0 + 1_499)).is_empty());
}

#[test]
fn announce_now_bumps_the_seq_and_restarts_the_interval() {
    let mut m = engine();
    m.handle(Event::Tick, T0);
    match m.handle(Event::AnnounceNow, T0 + 30).as_slice() {
        [Command::Announce(r)] => assert_eq!((r.seq, r.leaving), (GEN + 2, false)),
        other => panic!("expected one announcement, got {other:?}"),
    }
    let next_tick = m.handle(Event::Tick, T0 + 100);
    assert!(
        next_tick.iter().all(|c| !matches!(c, Command::Announce(_))),
        "interval counts from the last announcement"
    );
}

#[test]
fn a_new_raft_role_is_announced_at_once() {
    let mut m = engine();
    let out = m.handle(
        Event::LocalRaftRole(Some(mesh_types::RaftRole::Voter)),
        T0 + 1,
    );
    assert!(
        matches!(out.as_slice(), [Command::Announce(r)] if r.raft == Some(mesh_types::RaftRole::Voter))
    );
    assert!(m
        .handle(
            Event::LocalRaftRole(Some(mesh_types::RaftRole::Voter)),
            T0 + 2
        )
        .is_empty());
    assert_eq!(m.view(T0 + 3)[0].raft, Some(mesh_types::RaftRole::Voter));
}

#[test]
fn an_announcement_after_leave_still_says_leaving() {
    let mut m = engine();
    m.handle(Event::Leave, T0);
    match m
        .handle(
            Event::LocalAddrs(vec!["/ip4/10.0.0.9/tcp/1".into()]),
            T0 + 1,
        )
        .as_slice()
    {
        [Command::Announce(r)] => assert!(r.leaving, "a leave must not be withdrawn"),
        other => panic!("expected one announcement, got {other:?}"),
    }
}

#[test]
fn a_replayed_record_does_not_bring_a_gone_member_back() {
    let mut m = engine();
    m.handle(Event::Record(record("peer", GEN + 5, T0)), T0);
    // Dead after 3 s of silence, forgotten 60 s later.
    m.handle(Event::Tick, T0 + 3_000);
    let out = m.handle(Event::Tick, T0 + 63_000);
    assert!(out.contains(&Command::Forgot(peer())), "{out:?}");
    // A captured record, replayed: older than dead_after + skew.
    let out = m.handle(Event::Record(record("peer", GEN + 5, T0)), T0 + 63_001);
    assert_eq!(
        out,
        vec![Command::RecordIgnored {
            node: peer(),
            reason: IgnoreReason::TooOld
        }]
    );
    // Even re-stamped recently (a replay cannot re-sign, but a restarted
    // peer's clock may lag): a seq at or below the tombstone is stale.
    let out = m.handle(
        Event::Record(record("peer", GEN + 5, T0 + 63_000)),
        T0 + 63_001,
    );
    assert_eq!(
        out,
        vec![Command::RecordIgnored {
            node: peer(),
            reason: IgnoreReason::Stale
        }]
    );
    assert_eq!(m.state(&peer()), None);
    // The real node, restarted (a higher generation): a member again.
    let out = m.handle(
        Event::Record(record("peer", 2 * GEN + 1, T0 + 63_000)),
        T0 + 63_001,
    );
    assert_eq!(
        changes(&out),
        vec![("peer".into(), None, MemberState::Alive)]
    );
}

#[test]
fn a_full_view_makes_room_only_by_forgetting_the_gone() {
    let mut m = Membership::new(
        Config {
            max_members: 3,
            ..config()
        },
        record("local", GEN, T0),
        T0,
    );
    for id in ["a", "b", "c"] {
        m.handle(Event::Record(record(id, GEN + 1, T0)), T0);
    }
    // Full of live members: a fourth is not taken.
    let out = m.handle(Event::Record(record("d", GEN + 1, T0 + 10)), T0 + 10);
    assert_eq!(
        out,
        vec![Command::RecordIgnored {
            node: NodeId("d".into()),
            reason: IgnoreReason::Full
        }]
    );
    // a and b keep announcing, c goes silent and dies: d takes its place.
    for t in [1_000, 2_000, 3_000, 3_500] {
        m.handle(Event::Record(record("a", GEN + 1 + t, T0 + t)), T0 + t);
        m.handle(Event::Record(record("b", GEN + 1 + t, T0 + t)), T0 + t);
        m.handle(Event::Tick, T0 + t);
    }
    assert_eq!(m.state(&NodeId("c".into())), Some(MemberState::Dead));
    let out = m.handle(Event::Record(record("d", GEN + 2, T0 + 3_500)), T0 + 3_500);
    assert!(
        out.contains(&Command::Forgot(NodeId("c".into()))),
        "{out:?}"
    );
    assert_eq!(m.state(&NodeId("d".into())), Some(MemberState::Alive));
    assert_eq!(m.view(T0 + 3_500).len(), 4, "local + 3");
}
