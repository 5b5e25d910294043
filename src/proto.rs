//! Code generated from `proto/muster/v1/muster.proto`, and its descriptor set
//! for server reflection.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("muster.v1");
}

pub use v1::*;

/// The encoded descriptor set of the muster protocol.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("muster_descriptor");
