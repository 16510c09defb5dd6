#[derive(Debug, Clone)]
#[derive(Default)]
pub(crate) struct CommandState {
    /// The sequence number of the last finished sm command.
    pub(crate) finished_sm_seq: u64,

    /// agentmesh patch: snapshot installs sent to the state machine worker and not yet
    /// reported done. A log purge waits while there are any (see `RaftCore::run_command`).
    pub(crate) snapshot_installs_in_flight: u64,
}
