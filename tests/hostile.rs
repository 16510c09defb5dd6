//! Hostile clients of the HTTP API (issue 12): a foreign Host header (DNS
//! rebinding) is refused, and a 100 MB body is refused without being read.
//! The hostile libp2p peer of issue 12 is not here yet.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{start, NodeSpec};

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_foreign_host_is_refused_and_a_huge_body_is_not_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = start(&NodeSpec::new("a", &tmp.path().join("a"), "eu-west"));

    // DNS rebinding: a page on evil.example resolved to 127.0.0.1.
    let mut stream = TcpStream::connect(&node.api).expect("connect");
    stream
        .write_all(b"GET /v1/health HTTP/1.0\r\nHost: evil.example:7070\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert_eq!(status_of(&response), 421, "{response}");
    assert!(response.contains("foreign_host"), "{response}");

    // Addressed by IP, as the CLI does: fine.
    let mut stream = TcpStream::connect(&node.api).expect("connect");
    write!(
        stream,
        "GET /v1/health HTTP/1.0\r\nHost: {}\r\n\r\n",
        node.api
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert_eq!(status_of(&response), 200, "{response}");

    // 100 MB announced: refused once the body passes the limit, long before 100 MB.
    let mut stream = TcpStream::connect(&node.api).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "PUT /v1/regions/eu-west/policy HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n",
        node.api
    )
    .expect("send");
    // The node reads no more than its 64 KiB body limit: send one byte
    // more (all of which it reads, so it closes without a reset).
    stream
        .write_all(&vec![b' '; 64 * 1024 + 1])
        .expect("the limit and one byte");
    let mut head = [0u8; 512];
    let n = stream.read(&mut head).expect("an answer without the body");
    let response = String::from_utf8_lossy(&head[..n]).into_owned();
    assert_eq!(status_of(&response), 413, "{response}");
}
