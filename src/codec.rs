//! The protobuf codec every muster service and client uses: prost's, with
//! small per-stream buffers.
//!
//! tonic's default gives each stream an 8 KiB encode and an 8 KiB decode
//! buffer that live as long as the stream. Our messages are a few dozen
//! bytes, and a coordinator holds one long-lived stream per agent, so those
//! buffers would be most of its memory per agent. Buffers still grow for a
//! large message (up to the request limit) and yield at the usual threshold.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
const BUFFER_BYTES: usize = 512;
/// tonic's default: how much an encoder buffers before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
