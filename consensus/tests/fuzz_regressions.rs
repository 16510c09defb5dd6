//! Inputs that crash (or crashed) a decoder of the consensus codec, kept as
//! regression tests next to the fuzz targets (fuzz/, scripts/fuzz.sh): each
//! must now decode to an error.

use consensus::codec::{self, CodecError};
use consensus::rpc::RaftReply;
use openraft::error::{Fatal, RaftError};
use openraft::{AnyError, StorageError, StorageIOError};

/// A Raft reply whose storage error's `AnyError` has `source` errors nested
/// `depth` deep: each level is 3 bytes on the way in (no type, an empty
/// message, `Some`) and 2 on the way out (no context, no backtrace).
fn nested_error_reply(depth: usize) -> Vec<u8> {
    let reply = RaftReply::AppendEntries(Err(RaftError::Fatal(Fatal::StorageError(
        StorageError::from(StorageIOError::read_logs(AnyError::error("QQ"))),
    ))));
    let mut bytes = codec::encode(&reply).expect("encodes");
    // The innermost AnyError: no type, "QQ", no source, no context, no backtrace.
    let leaf = [0, 2, b'Q', b'Q', 0, 0, 0];
    let at = bytes
        .windows(leaf.len())
        .position(|w| w == leaf)
        .expect("the AnyError in the encoding");
    let mut nested = [0u8, 0, 1].repeat(depth);
    nested.extend_from_slice(&[0, 0, 0, 0, 0]);
    nested.extend_from_slice(&[0, 0].repeat(depth));
    bytes.splice(at..at + leaf.len(), nested);
    bytes
}

/// Found while writing the raft_rpc fuzz target (a coverage-guided fuzzer
/// gains no coverage from deeper nesting, so it is kept here by hand): a
/// reply nesting error sources a million deep (5 MB, under the 16 MiB frame limit) overflowed the stack
/// of the thread decoding it (bincode has no depth limit, and the decode,
/// the drop and the `Display` of such an error all recurse). A peer that is
/// asked anything can answer that. Refused now at a fixed depth.
#[test]
fn a_reply_with_errors_nested_a_million_deep_is_an_error_not_a_stack_overflow() {
    let bytes = nested_error_reply(1_000_000);
    assert!(bytes.len() < 16 * 1024 * 1024);
    let decoded = codec::decode::<RaftReply>(&bytes);
    assert!(matches!(decoded, Err(CodecError::Decode(_))), "{decoded:?}");
}

/// A few levels of nesting are what openraft's own errors have: fine.
#[test]
fn a_reply_with_a_few_nested_errors_decodes() {
    let decoded = codec::decode::<RaftReply>(&nested_error_reply(8)).expect("decodes");
    assert!(matches!(
        decoded,
        RaftReply::AppendEntries(Err(RaftError::Fatal(_)))
    ));
}
