//! The region policy: parsed from TOML as `policy apply -f FILE` does
//! (node/src/region_cli.rs: `toml::from_str::<Policy>`, then `validate`),
//! and from JSON as the HTTP API reads a policy body. A policy that parses
//! prints (`policy get`) and parses back to itself, and survives the Raft
//! log's codec.
#![no_main]

use consensus::RegionCommand;
use libfuzzer_sys::fuzz_target;
use mesh_types::policy::Policy;

fn check(policy: Policy) {
    let _ = policy.validate();
    let text = toml::to_string_pretty(&policy).expect("a parsed policy prints as TOML");
    let again: Policy = toml::from_str(&text).expect("a printed policy parses");
    assert_eq!(again, policy);
    let json = serde_json::to_vec(&policy).expect("a parsed policy prints as JSON");
    let again: Policy = serde_json::from_slice(&json).expect("JSON parses back");
    assert_eq!(again, policy);
    let command = RegionCommand::SetPolicy(policy);
    let stored = consensus::codec::encode(&command).expect("encodes");
    let again: RegionCommand = consensus::codec::decode(&stored).expect("decodes");
    assert_eq!(again, command);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(policy) = toml::from_str::<Policy>(text) {
            check(policy);
        }
    }
    if let Ok(policy) = serde_json::from_slice::<Policy>(data) {
        check(policy);
    }
});
