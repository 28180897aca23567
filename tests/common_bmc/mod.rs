//! Helpers for the flash, write and reimage tests: test doubles served on 127.0.0.1 only.
#![allow(dead_code)]

pub mod bmc;
pub mod fixture;
pub mod http;
#[path = "../common/k3s.rs"]
pub mod k3s;
pub mod kube;
