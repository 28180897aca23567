//! The identity kiln embeds in every image (boot partition `kiln.json` and
//! `/etc/kiln/node.json`): made here, from the node's plan and its resolved inputs, because
//! it is part of the root filesystem; read back by `inspect`, `flash`, `write` and `reimage`.

use crate::config::inventory::Role;
use crate::fetch::loader::LoaderRecord;
use crate::plan::{JoinMode, NodePlan};
use anyhow::Result;
use serde::Serialize;
use std::net::Ipv4Addr;

/// The identity kiln embeds in every image (boot partition `kiln.json` and `/etc/kiln/node.json`).
/// Holds no secrets: it sits on the FAT partition.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub kiln_version: String,
    pub node: String,
    pub cluster: String,
    pub board: String,
    pub ip: Ipv4Addr,
    pub role: Role,
    pub bootstrap: bool,
    pub slot: Option<u8>,
    /// The storage device it boots from (a `[target.*]` of its board).
    pub target: String,
    /// The board revision (`[variant.*]`), if the node names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// One-time firmware settings its target needs (the Pi 5's EEPROM), for `kiln write`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firmware_settings: Vec<String>,
    /// The command that sets them (the board's `eeprom_tool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_tool: Option<String>,
    pub inventory_sha256: String,
    pub board_sha256: String,
    pub base_sha256: String,
    /// Unix time the image content is stamped with (SOURCE_DATE_EPOCH or the base's newest file).
    pub build_epoch: u64,
    /// `init` or `rejoin` (`kiln build --rejoin`, every reimage).
    #[serde(default)]
    pub join: JoinMode,
    /// k3s release tag, or `custom` for `--artifact k3s=`.
    #[serde(default)]
    pub k3s_version: String,
    /// sha256 of what of the configuration went into this node's image (`crate::plan::hash`):
    /// `kiln flash` compares it with the current plan. Empty in images from older kilns.
    #[serde(default)]
    pub plan_sha256: String,
    /// Boot loaders written at fixed offsets (the RK1's U-Boot): file, form, sha256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaders: Vec<LoaderRecord>,
    /// The target whose loader-only image (`<node>.<loader_on>.img`) holds `loaders` when this
    /// image cannot (the RK1 on NVMe: U-Boot stays on the eMMC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_on: Option<String>,
}

impl Identity {
    /// File name of the loader-only image beside this image, if the node has one.
    pub fn loader_image_name(&self) -> Option<String> {
        self.loader_on
            .as_ref()
            .map(|t| format!("{}.{t}.img", self.node))
    }

    /// What the user must set once on the board before this image boots from its target, or
    /// `None` when nothing is needed.
    pub fn firmware_advice(&self) -> Option<String> {
        if self.firmware_settings.is_empty() {
            return None;
        }
        let mut s = format!(
            "{}: to boot from {}, this board needs these settings once (an image cannot set them); run `{}` on it and set:",
            self.node,
            self.target,
            self.firmware_tool
                .as_deref()
                .unwrap_or("the board's firmware tool"),
        );
        for l in &self.firmware_settings {
            s.push_str("\n    ");
            s.push_str(l);
        }
        Some(s)
    }
}

/// What of a node's resolved inputs goes into its identity besides its plan.
pub struct Resolved<'a> {
    /// sha256 of the base tarball.
    pub base_sha256: &'a str,
    /// Unix time the content is stamped with.
    pub epoch: u64,
    pub k3s_version: &'a str,
    /// Boot loaders read from their artifacts, in board order.
    pub loaders: Vec<LoaderRecord>,
}

/// The node's identity: its plan and what its inputs turned out to be.
pub fn of(plan: &NodePlan, r: Resolved) -> Result<Identity> {
    Ok(Identity {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        node: plan.node.name.clone(),
        cluster: plan.node.cluster.clone(),
        board: plan.board.name().to_string(),
        ip: plan.node.ip,
        role: plan.node.role,
        bootstrap: plan.node.bootstrap,
        slot: plan.node.slot,
        target: plan.node.target.clone(),
        variant: plan.node.variant.clone(),
        firmware_settings: plan.firmware_settings(),
        firmware_tool: plan
            .target()
            .filter(|t| !t.eeprom.is_empty())
            .and(plan.board.spec.eeprom_tool.clone()),
        inventory_sha256: plan.inventory_sha256.clone(),
        board_sha256: plan.board.sha256.clone(),
        base_sha256: r.base_sha256.to_string(),
        build_epoch: r.epoch,
        join: plan.join,
        k3s_version: r.k3s_version.to_string(),
        plan_sha256: crate::plan::hash::of_plan(plan)?,
        loaders: r.loaders,
        loader_on: plan.loader_on().map(str::to_string),
    })
}
