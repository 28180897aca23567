# kiln: `make image` builds the example inventory's images, `make test` runs every test.
# Both install what they need first (system packages as root; otherwise they print the command).

CARGO ?= cargo
KILN := target/release/kiln
OUT ?= out
# The base root filesystem (a Debian tarball with a kernel and initramfs), until kiln builds it.
BASE ?=
# The RK1's U-Boot (u-boot-rockchip.bin); RK1 nodes are skipped without it.
UBOOT ?=

.PHONY: image test setup build check lint tpi clean

setup:
	@bash tools/setup-host.sh

build: setup
	$(CARGO) build --release --locked

image: build
	@if [ -z "$(BASE)" ]; then \
	  echo "make image needs BASE=<rootfs.tar[.gz|.zst]>: a Debian root filesystem with a kernel and initramfs" >&2; \
	  echo "  e.g. mmdebstrap --arch=arm64 --include=linux-image-arm64,initramfs-tools,systemd-sysv trixie base.tar.zst" >&2; \
	  exit 2; fi
	$(KILN) secrets init
	$(KILN) check
	$(KILN) build --all --skip-missing --out $(OUT) --artifact base=$(BASE) \
	  $(if $(UBOOT),--artifact uboot=$(UBOOT))

# The official Turing Pi client, which the flash tests run against kiln's fake BMC.
TPI_ROOT ?= $(HOME)/.cache/kiln/tpi
export KILN_TPI ?= $(TPI_ROOT)/bin/tpi
tpi:
	@[ -x "$(KILN_TPI)" ] || $(CARGO) install tpi --version 1.0.7 --locked --root $(TPI_ROOT)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

test: setup lint tpi
	$(CARGO) test --locked

clean:
	rm -rf $(OUT)
