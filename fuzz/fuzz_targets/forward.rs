//! Node-to-node forwarding (`/agentmesh/forward/1`, mesh-net's `forward`):
//! a frame read with `forward::read_frame` as a serving node reads a
//! request, then the bytes decoded as a request and as an answer. A message
//! that decodes encodes to the bytes it came from (trailing bytes are refused).
#![no_main]

use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use mesh_net::forward::{self, FORWARD_REQUEST_MAX};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = futures::executor::block_on(forward::read_frame(
        &mut Cursor::new(data),
        FORWARD_REQUEST_MAX,
    )) {
        assert!(frame.len() <= FORWARD_REQUEST_MAX);
        assert_eq!(&data[4..4 + frame.len()], frame.as_slice());
    }
    if let Ok(request) = forward::decode_request(data) {
        let again = forward::decode_request(&forward::encode_request(&request));
        assert_eq!(again.as_ref(), Ok(&request));
    }
    if let Ok(response) = forward::decode_response(data) {
        let again = forward::decode_response(&forward::encode_response(&response));
        assert_eq!(again.as_ref(), Ok(&response));
    }
});
