//! A request-response codec for opaque frames: a 4-byte big-endian length,
//! then that many bytes. Each protocol on top (member sync now, Raft RPCs
//! later) encodes its own messages, with a version byte of its own.

use async_trait::async_trait;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// Largest frame accepted: the largest member-sync answer (at most
/// `actor::SYNC_ANSWER_BYTES_MAX` of records, 4 MiB, plus a few bytes of
/// framing per record) with a margin. Memory grows with the bytes that
/// arrive, not with the length a peer claims.
pub const FRAME_LEN_MAX: usize = 5 * 1024 * 1024;

/// The codec; stateless.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

/// Largest request: a sync request carries the sender's own record.
pub const REQUEST_LEN_MAX: usize = 128 * 1024;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    crate::forward::read_frame(io, FRAME_LEN_MAX).await
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l as usize <= FRAME_LEN_MAX)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

#[async_trait]
impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        crate::forward::read_frame(io, REQUEST_LEN_MAX).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_frame(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;

    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused() {
        futures::executor::block_on(async {
            let mut wire = Cursor::new(Vec::new());
            write_frame(&mut wire, b"hello").await.expect("write");
            let mut read = Cursor::new(wire.into_inner());
            assert_eq!(read_frame(&mut read).await.expect("read"), b"hello");

            let mut huge = Cursor::new(((FRAME_LEN_MAX + 1) as u32).to_be_bytes().to_vec());
            let err = read_frame(&mut huge).await.expect_err("too large");
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

            let mut truncated = Cursor::new(vec![0, 0, 0, 9, 1, 2]);
            assert!(read_frame(&mut truncated).await.is_err());
        });
    }
}
