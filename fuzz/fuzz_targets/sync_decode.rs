//! `mesh_net::sync::SyncMessage::decode`: a member-sync request or answer
//! from a peer, then every entry's envelope, as the network actor does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_net::sync::SyncMessage;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = SyncMessage::decode(data) else {
        return;
    };
    for entry in &message.entries {
        if let Ok((record, signer)) = mesh_net::envelope::open(&entry.envelope) {
            assert_eq!(record.node_id.0, signer.to_base58());
        }
    }
    let again = SyncMessage::decode(&message.encode()).expect("a decoded message round-trips");
    assert_eq!(again, message);
});
