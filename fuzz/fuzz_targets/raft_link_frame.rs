//! `mesh_net::codec::FrameCodec` (4-byte length, then the bytes) through its
//! public `libp2p::request_response::Codec` impl, reading a request and a
//! response from the input. A frame that reads writes back to the same bytes.
//!
//! The Raft link's own 13-byte-header reader (`raft_link::read_frame`) is
//! private and not fuzzed here.
#![no_main]

use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;
use mesh_net::codec::{FrameCodec, FRAME_LEN_MAX};

const PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/fuzz/1");

fuzz_target!(|data: &[u8]| {
    futures::executor::block_on(async {
        let mut codec = FrameCodec;
        let mut io = Cursor::new(data);
        let request = codec.read_request(&PROTOCOL, &mut io).await;
        if let Ok(frame) = &request {
            assert!(frame.len() <= FRAME_LEN_MAX);
            assert_eq!(&data[4..4 + frame.len()], frame.as_slice());
            let mut out = Cursor::new(Vec::new());
            codec
                .write_request(&PROTOCOL, &mut out, frame.clone())
                .await
                .expect("a frame that was read can be written");
            assert_eq!(out.into_inner(), data[..4 + frame.len()]);
        }
        // What follows the first frame, read as a response.
        if let Ok(frame) = codec.read_response(&PROTOCOL, &mut io).await {
            assert!(frame.len() <= FRAME_LEN_MAX);
        }
    });
});
