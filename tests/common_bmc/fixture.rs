//! A scratch workspace for flash/reimage tests: a small board profile (`tiny`, 4 slots), an
//! inventory on 127.0.0.0/8 whose `[bmc]` points at a fake BMC, a minimal base tarball, and
//! kiln images built from them with the real build path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Workspace {
    pub dir: PathBuf,
}

const BOARD: &str = r#"name = "tiny"
description = "test board: small GPT layout with slots"
arch = "arm64"
slots = 4
boot = "extlinux"
default_target = "emmc"

[target.emmc]
description = "test eMMC, written through the BMC"
bmc_flash = true

[partition_table]
kind = "gpt"

[[partition]]
name = "boot"
fs = "vfat"
content = "boot"
start = "1MiB"
size = "64MiB"
bootable = true
label = "BOOT"
type = "basic-data"

[[partition]]
name = "root"
fs = "ext4"
content = "rootfs"
size = "auto"
headroom = "64MiB"
label = "rootfs"
type = "linux-root-arm64"

[kernel]
file = "vmlinuz"
initrd = "initrd.img"
cmdline = ["rw"]
consoles = ["ttyS0,115200"]

[devicetree]
copy = []
fdtdir = "/dtbs/"
"#;

/// Node table: (name, ip, role, bootstrap, slot).
pub const NODES: &[(&str, &str, &str, bool, Option<u8>)] = &[
    ("n1", "127.0.0.11", "server", true, Some(1)),
    ("n2", "127.0.0.12", "server", false, Some(2)),
    ("a3", "127.0.0.13", "agent", false, Some(3)),
    ("loose", "127.0.0.14", "agent", false, None),
];

impl Workspace {
    /// `bmc`: `host:port` and certificate fingerprint; `None` leaves `[bmc]` out.
    /// `ip_base` shifts node addresses so parallel tests do not share them.
    pub fn new(
        name: &str,
        bmc: Option<(&str, Option<&str>)>,
        kubeconfig: Option<&str>,
        ip_base: u8,
    ) -> Workspace {
        let dir = std::env::temp_dir().join(format!("kiln-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("boards")).unwrap();
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        std::fs::write(dir.join("boards/tiny.toml"), BOARD).unwrap();
        let tok = dir.join("secrets/prod.token");
        std::fs::write(&tok, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut inv =
            String::from("[network]\ncidr = \"127.0.0.0/8\"\ngateway = \"127.0.0.1\"\n\n");
        if let Some((host, fp)) = bmc {
            inv.push_str(&format!(
                "[bmc]\nhost = \"{host}\"\nuser = \"{}\"\n",
                super::bmc::USER
            ));
            if let Some(fp) = fp {
                inv.push_str(&format!("tls_sha256 = \"{fp}\"\n"));
            }
            inv.push('\n');
        }
        inv.push_str("[[cluster]]\nname = \"prod\"\ntoken_file = \"secrets/prod.token\"\n");
        if let Some(k) = kubeconfig {
            inv.push_str(&format!("kubeconfig = \"{k}\"\n"));
        }
        for (n, ip, role, boot, slot) in NODES {
            let ip = shift(ip, ip_base);
            inv.push_str(&format!(
                "\n[[node]]\nname = \"{n}\"\ncluster = \"prod\"\nboard = \"tiny\"\nip = \"{ip}\"\nrole = \"{role}\"\n"
            ));
            if *boot {
                inv.push_str("bootstrap = true\n");
            }
            if let Some(s) = slot {
                inv.push_str(&format!("slot = {s}\n"));
            }
        }
        std::fs::write(dir.join("kiln.toml"), inv).unwrap();
        write_base(&dir.join("base.tar"));
        super::k3s::write_standins(&dir);
        Workspace { dir }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// `--artifact` arguments: the base and the k3s stand-ins (test doubles).
    pub fn artifact_args(&self) -> Vec<String> {
        let mut a = vec!["--artifact".to_string(), "base=base.tar".to_string()];
        a.extend(super::k3s::artifact_args(&self.dir));
        a
    }

    /// Builds `out/<node>.img` with the library's build path.
    pub fn build(&self, node: &str) -> PathBuf {
        let cfg = kiln::config::load(&self.path("kiln.toml"), &self.path("boards"), true).unwrap();
        let mut art = std::collections::BTreeMap::new();
        art.insert("base".to_string(), self.path("base.tar"));
        art.insert("k3s".to_string(), self.path("k3s-standin"));
        art.insert(
            "k3s-images".to_string(),
            self.path("k3s-airgap-images-arm64.tar.zst"),
        );
        let req = kiln::build::Request {
            cfg: &cfg,
            nodes: vec![node.to_string()],
            out: self.path("out"),
            supplied: art,
            skip_missing: false,
            join: kiln::plan::JoinMode::Init,
            cache: kiln::fetch::Cache {
                root: self.path("cache"),
            },
            formats: vec![kiln::publish::Format::Raw],
        };
        let mut o = kiln::build::run(&req).unwrap();
        assert!(o.failed.is_empty(), "{:?}", o.failed);
        o.built.pop().unwrap().path
    }

    /// Runs the kiln binary in the workspace with the fake BMC's password.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_env(args, &[("KILN_BMC_PASSWORD", super::bmc::PASSWORD)])
    }

    pub fn kiln_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.kiln_command(args, env).output().unwrap()
    }

    /// The `kiln` command `kiln_env` runs, for tests that start it in the background.
    pub fn kiln_command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.current_dir(&self.dir)
            .args(args)
            .env_remove("KILN_BMC_PASSWORD")
            .env_remove("KUBECONFIG")
            .env("KILN_CACHE_DIR", self.dir.join("cache"));
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }
}

pub fn shift(ip: &str, base: u8) -> String {
    let mut o: Vec<u8> = ip.split('.').map(|x| x.parse().unwrap()).collect();
    o[2] = base;
    o.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_base(p: &Path) {
    let f = std::fs::File::create(p).unwrap();
    let mut b = tar::Builder::new(f);
    let mut add = |path: &str, data: &[u8], dir: bool| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    for d in ["./", "./boot/", "./etc/", "./usr/", "./var/"] {
        add(d, &[], true);
    }
    add("./boot/vmlinuz-6.12.0-test", &vec![0x4b; 300_000], false);
    add("./boot/initrd.img-6.12.0-test", &vec![0x17; 200_000], false);
    add("./etc/hostname", b"base\n", false);
    b.finish().unwrap();
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(std::fs::read(p).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}
