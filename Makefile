# kiln: `make image` builds the example inventory's images, `make test` runs every test.
# Both install what they need first (system packages as root; otherwise they print the command).

CARGO ?= cargo
KILN := target/release/kiln
OUT ?= out
# The RK1's U-Boot (u-boot-rockchip.bin); RK1 nodes are skipped without it.
UBOOT ?=
# Optional overrides (offline builds): a base tarball instead of the mmdebstrap-built one, and
# k3s files instead of the [k3s] release download.
BASE ?=
K3S ?=
K3S_IMAGES ?=

.PHONY: image test test-fast test-slow bench setup build check lint tpi clean

setup:
	@bash tools/setup-host.sh

build: setup
	$(CARGO) build --release --locked

# Bases are built with mmdebstrap on first use (about 12 minutes per board under emulation)
# and cached in ~/.cache/kiln; k3s is downloaded once per version.
image: build
	$(KILN) secrets init
	$(KILN) check
	$(KILN) build --all --skip-missing --out $(OUT) \
	  $(if $(BASE),--artifact base=$(BASE)) \
	  $(if $(K3S),--artifact k3s=$(K3S)) \
	  $(if $(K3S_IMAGES),--artifact k3s-images=$(K3S_IMAGES)) \
	  $(if $(UBOOT),--artifact uboot=$(UBOOT))

# The official Turing Pi client, which the flash tests run against kiln's fake BMC.
TPI_ROOT ?= $(HOME)/.cache/kiln/tpi
export KILN_TPI ?= $(TPI_ROOT)/bin/tpi
tpi:
	@[ -x "$(KILN_TPI)" ] || $(CARGO) install tpi --version 1.0.7 --locked --root $(TPI_ROOT)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

# Fast tier: everything but the real Debian bases and the QEMU boots.
test-fast: setup lint tpi
	$(CARGO) test --locked

# Slow tier: real bases (mmdebstrap, cached; every board's in parallel first) and images booted
# under QEMU, one test at a time (each already runs several VMs on the two cores).
SLOW_TESTS := --test slow_base --test boot
test-slow: setup
	$(CARGO) build --locked
	target/debug/kiln base
	$(CARGO) test --locked $(SLOW_TESTS) -- --ignored --test-threads=1

test: test-fast test-slow

# kiln vs genimage, build --all vs single builds, peak RSS (needs root and the cached rk1 base).
bench: setup
	bash tools/bench.sh

clean:
	rm -rf $(OUT)
