//! kiln: bakes bootable per-node disk images for a bare-metal k3s cluster.
//!
//! Stages, each a module: config → plan → fetch → rootfs → image.

pub mod build;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod fetch;
pub mod flash;
pub mod image;
pub mod plan;
pub mod progress;
pub mod publish;
pub mod reimage;
pub mod rootfs;
pub mod secrets;
pub mod tls;
pub mod tool;
pub mod tree;
pub mod util;
pub mod write;
