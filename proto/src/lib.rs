//! The Trellis config-distribution API.
//!
//! [`v1::Snapshot`] is everything one proxy runs. It is the message the control plane pushes and
//! the document `trellis-proxy --snapshot FILE` reads (protobuf JSON mapping, in YAML or JSON).

#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/trellis.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/trellis.v1.serde.rs"));
}

/// The config stream's codec: prost's, with 1 KiB initial buffers (they grow to what a snapshot
/// needs) instead of tonic's 8 KiB. A stream keeps one buffer to encode and one to decode for
/// its whole life, and a control plane holds a stream per proxy.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    fn settings() -> BufferSettings {
        BufferSettings::new(1024, 32 * 1024)
    }

    #[derive(Debug, Clone, Copy)]
    pub struct ConfigCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for ConfigCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for ConfigCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(settings())
        }
    }
}

/// Durations as used in the API.
pub use pbjson_types::Duration;
