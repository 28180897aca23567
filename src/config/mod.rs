//! Configuration stage: the inventory and the board profiles, parsed and validated together.

pub mod board;
pub mod diag;
pub mod inventory;
pub mod net;
pub mod size;

use board::Board;
use diag::Diagnostics;
use inventory::Inventory;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything a build reads from the user, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub inventory: Inventory,
    pub boards: BTreeMap<String, Board>,
}

impl Config {
    /// The board profile of a node. Validation guarantees every node's board exists.
    pub fn board_of(&self, node: &inventory::Node) -> Option<&Board> {
        self.boards.get(&node.board)
    }
}

/// Board directory used when none is given: `boards/` beside the inventory.
pub fn default_boards_dir(inventory: &Path) -> PathBuf {
    inventory
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
        .join("boards")
}

/// Loads boards, then the inventory against them; all problems are returned together.
pub fn load(
    inventory: &Path,
    boards_dir: &Path,
    check_tokens: bool,
) -> Result<Config, Diagnostics> {
    let boards = board::load_dir(boards_dir).map_err(Diagnostics)?;
    let inventory = inventory::load(inventory, &boards, check_tokens).map_err(Diagnostics)?;
    Ok(Config { inventory, boards })
}
