//! The membership engine: which nodes exist and whether they are alive.
//!
//! A pure state machine in the style of openraft's `Engine`: the caller feeds
//! [`Event`]s with the current time and executes the [`Command`]s that come
//! back. No IO, no clock, no randomness inside, so the same code runs in a
//! real node (driven by a tokio interval and gossipsub) and in the simulator
//! (driven by simulated time and links).
//!
//! ```text
//!  Event::Tick ──────────┐                 ┌──> Command::Announce(record)   publish on gossip
//!  Event::Record(r) ─────┼──> Membership ──┼──> Command::StateChanged{..}   log, metrics
//!  Event::SyncedRecord ──┤                 │
//!  Event::LocalAddrs(..) ┤       (view)    ├──> Command::RecordIgnored{..}  log, metrics
//!  Event::AnnounceNow ───┤                 │
//!  Event::Leave ─────────┘                 └──> Command::Forgot(id)
//! ```
//!
//! Failure detection is timeout based: every node announces its record every
//! `announce_interval_ms`; a member silent for `suspect_after_ms` is suspect,
//! for `dead_after_ms` dead. A record with a higher `seq` revives it (a
//! restart bumps the generation in the high bits of `seq`). A record with
//! `leaving = true` makes it `left`, which is never confused with `dead`.

use std::collections::BTreeMap;

use mesh_types::{MemberState, MemberView, NodeId, NodeRecord, UnixMillis};

/// Timings of the failure detector. All in milliseconds of the caller's clock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How often a node announces its record. Default 500.
    pub announce_interval_ms: u64,
    /// Silence after which a member becomes `suspect`. Default 2000 (4 missed announcements).
    pub suspect_after_ms: u64,
    /// Silence after which a member becomes `dead`. Default 4000.
    pub dead_after_ms: u64,
    /// How long a dead or left member stays in the view before it is forgotten. Default 600000 (10 min).
    pub forget_after_ms: u64,
    /// Records stamped further than this in our future are ignored. Default 30000.
    pub max_clock_skew_ms: u64,
    /// Most members in the view. When it is full, a new member takes the
    /// place of the dead or left member forgotten longest ago, or is not
    /// taken. Default 4096.
    pub max_members: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            announce_interval_ms: 500,
            suspect_after_ms: 2_000,
            dead_after_ms: 4_000,
            forget_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
            max_members: 4096,
        }
    }
}

/// Why a timing configuration cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A view that can hold nobody.
    #[error("membership.max_members must be greater than 0")]
    NoMembers,
    /// A zero interval would announce in a busy loop.
    #[error("membership.announce_interval_ms must be greater than 0")]
    ZeroAnnounceInterval,
    /// Suspicion before the next announcement would flag healthy nodes.
    #[error("membership.suspect_after_ms ({suspect_after_ms}) must be greater than announce_interval_ms ({announce_interval_ms}), or every node looks suspect between two announcements")]
    SuspectBeforeAnnounce {
        /// Configured value.
        suspect_after_ms: u64,
        /// Configured value.
        announce_interval_ms: u64,
    },
    /// Death must come after suspicion.
    #[error("membership.dead_after_ms ({dead_after_ms}) must be greater than suspect_after_ms ({suspect_after_ms})")]
    DeadBeforeSuspect {
        /// Configured value.
        dead_after_ms: u64,
        /// Configured value.
        suspect_after_ms: u64,
    },
}

impl Config {
    /// Checks the relations between the timings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.announce_interval_ms == 0 {
            return Err(ConfigError::ZeroAnnounceInterval);
        }
        if self.suspect_after_ms <= self.announce_interval_ms {
            return Err(ConfigError::SuspectBeforeAnnounce {
                suspect_after_ms: self.suspect_after_ms,
                announce_interval_ms: self.announce_interval_ms,
            });
        }
        if self.max_members == 0 {
            return Err(ConfigError::NoMembers);
        }
        if self.dead_after_ms <= self.suspect_after_ms {
            return Err(ConfigError::DeadBeforeSuspect {
                dead_after_ms: self.dead_after_ms,
                suspect_after_ms: self.suspect_after_ms,
            });
        }
        Ok(())
    }
}

/// What happened, as seen by the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Time passed; call at least every few hundred milliseconds.
    Tick,
    /// A record arrived whose signature the caller has already checked.
    Record(NodeRecord),
    /// A record learned from a peer's view during a join sync: that peer
    /// received it `age_ms` ago. Liveness counts from then, and a record
    /// already older than the suspicion timeout is not taken, so a sync never
    /// resurrects a node that has gone silent.
    SyncedRecord {
        /// The record, signature checked by the caller.
        record: NodeRecord,
        /// How long ago the peer received it.
        age_ms: u64,
    },
    /// The local node's listen addresses changed.
    LocalAddrs(Vec<String>),
    /// The local node's role in its region group changed.
    LocalRaftRole(Option<mesh_types::RaftRole>),
    /// The local node is stopping on purpose: announce that it leaves.
    Leave,
    /// Announce now, for example because the first peer just became
    /// reachable and the last announcement reached nobody.
    AnnounceNow,
}

/// Why a received record changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Its `sent_at_ms` is beyond our clock plus the allowed skew.
    FromTheFuture,
    /// Its `seq` is lower than one we already have, or than the last one
    /// of a member we forgot (a replay).
    Stale,
    /// It was sent longer ago than a member takes to be declared dead (plus
    /// the allowed clock skew): a replayed record, which must not make a
    /// gone member alive again.
    TooOld,
    /// The view is full of live members.
    Full,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Publish this local record to the mesh.
    Announce(NodeRecord),
    /// A member entered a new state (`from` is `None` for a member seen for the first time).
    StateChanged {
        /// The member.
        node: NodeId,
        /// Previous state, if known.
        from: Option<MemberState>,
        /// New state.
        to: MemberState,
    },
    /// A record was not applied.
    RecordIgnored {
        /// Its claimed sender.
        node: NodeId,
        /// Why.
        reason: IgnoreReason,
    },
    /// A dead or left member was dropped from the view.
    Forgot(NodeId),
}

#[derive(Debug, Clone)]
struct Member {
    record: NodeRecord,
    state: MemberState,
    /// Local time at which the freshest record arrived.
    last_seen_at: UnixMillis,
    /// Local time of the last state change.
    state_since: UnixMillis,
}

/// The membership view of one node. See the crate docs.
#[derive(Debug)]
pub struct Membership {
    config: Config,
    local: NodeRecord,
    next_announce_at: UnixMillis,
    /// BTreeMap, not HashMap: iteration order must not depend on a random
    /// hasher, or the simulator would not be deterministic.
    members: BTreeMap<NodeId, Member>,
    /// The highest `seq` of each member forgotten, and when it was (at most
    /// `max_members`, the oldest dropped first): a replayed record of a
    /// forgotten member is stale, not a new member.
    tombstones: BTreeMap<NodeId, (u64, UnixMillis)>,
}

impl Membership {
    /// Creates the engine for `local`, whose `seq` MUST already hold the
    /// generation of this start in its high 32 bits. The first `Tick`
    /// announces at once.
    pub fn new(config: Config, local: NodeRecord, now: UnixMillis) -> Self {
        Self {
            config,
            local,
            next_announce_at: now,
            members: BTreeMap::new(),
            tombstones: BTreeMap::new(),
        }
    }

    /// The timings in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The local node's current record.
    pub fn local(&self) -> &NodeRecord {
        &self.local
    }

    /// Feeds one event; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: UnixMillis) -> Vec<Command> {
        let mut commands = Vec::new();
        match event {
            Event::Tick => self.tick(now, &mut commands),
            Event::Record(record) => self.on_record(record, now, now, &mut commands),
            Event::SyncedRecord { record, age_ms } => {
                if age_ms < self.config.suspect_after_ms {
                    self.on_record(record, now.saturating_sub(age_ms), now, &mut commands);
                }
            }
            Event::LocalAddrs(addrs) => {
                if addrs != self.local.addrs {
                    self.local.addrs = addrs;
                    // Tell the mesh right away rather than at the next interval.
                    commands.push(self.announce(now, false));
                }
            }
            Event::LocalRaftRole(role) => {
                if role != self.local.raft {
                    self.local.raft = role;
                    commands.push(self.announce(now, false));
                }
            }
            Event::Leave => commands.push(self.announce(now, true)),
            Event::AnnounceNow => commands.push(self.announce(now, false)),
        }
        commands
    }

    /// The view: the local node first, then members ordered by region and id.
    pub fn view(&self, now: UnixMillis) -> Vec<MemberView> {
        let mut rows = vec![MemberView {
            peer_id: self.local.node_id.clone(),
            region: self.local.region.clone(),
            state: MemberState::Alive,
            addrs: self.local.addrs.clone(),
            last_seen_ms: 0,
            version: self.local.version.clone(),
            is_self: true,
            api: self.local.api.clone(),
            raft: self.local.raft,
            models: self.local.models.iter().map(|m| m.name.clone()).collect(),
        }];
        let mut others: Vec<&Member> = self.members.values().collect();
        others.sort_by(|a, b| {
            (&a.record.region, &a.record.node_id).cmp(&(&b.record.region, &b.record.node_id))
        });
        rows.extend(others.into_iter().map(|m| MemberView {
            peer_id: m.record.node_id.clone(),
            region: m.record.region.clone(),
            state: m.state,
            addrs: m.record.addrs.clone(),
            last_seen_ms: now.saturating_sub(m.last_seen_at),
            version: m.record.version.clone(),
            is_self: false,
            api: m.record.api.clone(),
            raft: m.record.raft,
            models: m.record.models.iter().map(|m| m.name.clone()).collect(),
        }));
        rows
    }

    /// The freshest record of a member, if it is in the view.
    pub fn record(&self, node: &NodeId) -> Option<&NodeRecord> {
        self.members.get(node).map(|m| &m.record)
    }

    /// The state of a member, if it is in the view.
    pub fn state(&self, node: &NodeId) -> Option<MemberState> {
        self.members.get(node).map(|m| m.state)
    }

    /// How many remote members are in each state, in [`MemberState::ALL`] order.
    pub fn counts(&self) -> [(MemberState, usize); 4] {
        MemberState::ALL.map(|s| (s, self.members.values().filter(|m| m.state == s).count()))
    }

    fn announce(&mut self, now: UnixMillis, leaving: bool) -> Command {
        self.local.seq += 1;
        self.local.sent_at_ms = now;
        // Sticky: once leaving, any later announcement (new addresses during
        // the leave flush) still says so, or peers would see a death.
        self.local.leaving |= leaving;
        self.next_announce_at = now + self.config.announce_interval_ms;
        Command::Announce(self.local.clone())
    }

    fn tick(&mut self, now: UnixMillis, commands: &mut Vec<Command>) {
        if now >= self.next_announce_at {
            commands.push(self.announce(now, false));
        }
        let config = &self.config;
        let mut forgotten = Vec::new();
        for (id, member) in &mut self.members {
            let silence = now.saturating_sub(member.last_seen_at);
            let next = match member.state {
                MemberState::Alive | MemberState::Suspect if silence >= config.dead_after_ms => {
                    Some(MemberState::Dead)
                }
                MemberState::Alive if silence >= config.suspect_after_ms => {
                    Some(MemberState::Suspect)
                }
                MemberState::Dead | MemberState::Left
                    if now.saturating_sub(member.state_since) >= config.forget_after_ms =>
                {
                    forgotten.push(id.clone());
                    None
                }
                _ => None,
            };
            if let Some(to) = next {
                commands.push(Command::StateChanged {
                    node: id.clone(),
                    from: Some(member.state),
                    to,
                });
                member.state = to;
                member.state_since = now;
            }
        }
        for id in forgotten {
            self.forget(id, now, commands);
        }
    }

    /// Drops a member from the view, keeping its tombstone.
    fn forget(&mut self, id: NodeId, now: UnixMillis, commands: &mut Vec<Command>) {
        if let Some(member) = self.members.remove(&id) {
            if self.tombstones.len() >= self.config.max_members {
                let oldest = self
                    .tombstones
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(id, _)| id.clone());
                if let Some(oldest) = oldest {
                    self.tombstones.remove(&oldest);
                }
            }
            self.tombstones.insert(id.clone(), (member.record.seq, now));
            commands.push(Command::Forgot(id));
        }
    }

    /// Room for one more member: true if there is, perhaps after forgetting
    /// the dead or left member that has been so longest.
    fn make_room(&mut self, now: UnixMillis, commands: &mut Vec<Command>) -> bool {
        if self.members.len() < self.config.max_members {
            return true;
        }
        let gone = self
            .members
            .iter()
            .filter(|(_, m)| matches!(m.state, MemberState::Dead | MemberState::Left))
            .min_by_key(|(_, m)| m.state_since)
            .map(|(id, _)| id.clone());
        match gone {
            Some(id) => {
                self.forget(id, now, commands);
                true
            }
            None => false,
        }
    }

    /// Applies a record the sender made, that reached us (or a peer) at `seen_at`.
    fn on_record(
        &mut self,
        record: NodeRecord,
        seen_at: UnixMillis,
        now: UnixMillis,
        commands: &mut Vec<Command>,
    ) {
        if record.node_id == self.local.node_id {
            return; // our own announcement, echoed back
        }
        if record.sent_at_ms > now.saturating_add(self.config.max_clock_skew_ms) {
            commands.push(Command::RecordIgnored {
                node: record.node_id,
                reason: IgnoreReason::FromTheFuture,
            });
            return;
        }
        let oldest_alive = self
            .config
            .dead_after_ms
            .saturating_add(self.config.max_clock_skew_ms);
        if record.sent_at_ms.saturating_add(oldest_alive) < now {
            commands.push(Command::RecordIgnored {
                node: record.node_id,
                reason: IgnoreReason::TooOld,
            });
            return;
        }
        let to = if record.leaving {
            MemberState::Left
        } else {
            MemberState::Alive
        };
        if !self.members.contains_key(&record.node_id) {
            if let Some(&(seq, _)) = self.tombstones.get(&record.node_id) {
                if record.seq <= seq {
                    commands.push(Command::RecordIgnored {
                        node: record.node_id,
                        reason: IgnoreReason::Stale,
                    });
                    return;
                }
            }
            if !self.make_room(now, commands) {
                commands.push(Command::RecordIgnored {
                    node: record.node_id,
                    reason: IgnoreReason::Full,
                });
                return;
            }
            self.tombstones.remove(&record.node_id);
        }
        match self.members.get_mut(&record.node_id) {
            Some(member) if record.seq < member.record.seq => {
                commands.push(Command::RecordIgnored {
                    node: record.node_id,
                    reason: IgnoreReason::Stale,
                });
            }
            // The same record again (gossip delivers duplicates): nothing new.
            Some(member) if record.seq == member.record.seq => {}
            Some(member) => {
                let from = member.state;
                member.record = record;
                member.last_seen_at = member.last_seen_at.max(seen_at);
                if from != to {
                    member.state = to;
                    member.state_since = now;
                    commands.push(Command::StateChanged {
                        node: member.record.node_id.clone(),
                        from: Some(from),
                        to,
                    });
                }
            }
            None => {
                let node = record.node_id.clone();
                self.members.insert(
                    node.clone(),
                    Member {
                        record,
                        state: to,
                        last_seen_at: seen_at,
                        state_since: now,
                    },
                );
                commands.push(Command::StateChanged {
                    node,
                    from: None,
                    to,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
